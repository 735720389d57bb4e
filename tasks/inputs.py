"""A single-stage run's given inputs: `chatforge stage mid --input base=import/karpathy--nanochat-d32`.

A stage normally reads, for each input, the artifact the config plans for it (tasks/stage.py `plan`). A given input
names another artifact instead: a ref, a key, a unique key prefix, or `hf://org/repo[@rev]` (pulled into the store).
It must be committed and of the kind the input's stage makes -- a checkpoint for `base`/`mid`/`sft`/`rl`, an evalset
for `chat_evalset`... -- and a training stage's starting checkpoint must have been made by that stage (model.json's
"stage", which `chatforge import` writes too), as model/train/common.py `load_start` requires. Every check is one
line, before anything is recorded or computed. The resolved keys go into `plan`, so the stage's key and the parents
in its manifest name the artifacts it read.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from artifacts.errors import StoreError
from artifacts.store import Store
from model.errors import InputError

from .registry import get
from .stage import StageDef


def parse(pairs: Sequence[str]) -> dict[str, str]:
    """`["base=base/latest", ...]` (the repeatable `--input NAME=REF`) -> {name: ref}."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, ref = pair.partition("=")
        name, ref = name.strip(), ref.strip()
        if not sep or not name or not ref:
            raise InputError(f"bad --input {pair!r}: write it as NAME=REF, e.g. --input base=base/latest "
                             "(a ref, a key or key prefix, or hf://org/repo)")
        if name in out:
            raise InputError(f"--input {name}= is given twice ({out[name]!r} and {ref!r}): give each input once")
        out[name] = ref
    return out


def check_names(stage: StageDef, given: Mapping[str, str]) -> None:
    """Every given input is one the stage reads."""
    for name in given:
        if name not in stage.inputs:
            raise InputError(f"stage {stage.name!r} has no input {name!r}: its inputs are {', '.join(stage.inputs)}")


def resolve(stage: StageDef, given: Mapping[str, str], store: Store) -> dict[str, str]:
    """{input name: key} of the given inputs, each checked: committed, intact, and of the kind the input takes.
    Reads the store only, except that an `hf://` reference is pulled into it (as `chatforge artifacts pull`)."""
    check_names(stage, given)
    out: dict[str, str] = {}
    for name, ref in given.items():
        where = f"input {name}={ref} of stage {stage.name}"
        try:
            key = _key(ref, store)
            m = store.manifest(key)
        except StoreError as e:
            raise type(e)(f"{where}: {e}") from None
        if m is None:
            raise InputError(f"{where}: no committed artifact {key[:12]} in {store.url} (its ref outlived it?): "
                             "see `chatforge artifacts ls`")
        want = get(name).kind
        if m.kind != want:
            raise InputError(f"{where}: {key[:12]} is {_a(m.kind)} artifact (made by {m.stage}), but {name} takes "
                             f"{_a(want)}: pass {_a(want)} artifact")
        if want == "checkpoint" and stage.kind == "checkpoint":
            made_by = _checkpoint_stage(store, key, m)
            if made_by != name:
                raise InputError(f"{where}: {stage.name} starts from a {name} checkpoint, but {key[:12]} is a checkpoint "
                                 f"of {made_by or 'no stage'} (its model.json): pass a {name} checkpoint")
        out[name] = key
    return out


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _key(ref: str, store: Store) -> str:
    from artifacts.models import parse_hf, pull

    if parse_hf(ref):
        store.ensure_writable()  # a pull commits into the store
        return pull(ref, store)
    return store.resolve(ref)


def _checkpoint_stage(store: Store, key: str, m) -> str | None:
    """model.json's "stage" of a checkpoint artifact (read from the store, not pulled whole); None without one.
    A model.json without "stage" is base's, as model/train/common.py reads it."""
    if "model.json" not in m.files:
        return None
    try:
        meta = store.read_json(f"{store.artifact_dir(key)}/model.json")
    except (OSError, ValueError):
        return None
    return meta.get("stage", "base") if isinstance(meta, dict) and "model" in meta else None
