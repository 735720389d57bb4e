"""`chatforge export`, `chatforge import` and `artifacts push --format transformers`: checkpoints in and out of
the store as transformers `nanochat` models (the conversion itself is model/hf/; this is the store side).

An import is committed like any artifact (staged, hashed, manifest last) under a content-derived key: the
sha256 over the checkpoint files it produces, so importing the same model twice, from a directory or the Hub,
gives one key. Our own export coming back into a store that holds the checkpoint it was made from (config.json
records that key) with the same files is that checkpoint: the import names it and adds nothing. Its provenance (source, revision, source file hashes, the chatforge key
it was exported from, notes on what was adapted) is the manifest's config; it is refused before anything is
written when the model is not one our GPT can run.
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

from artifacts.errors import StoreError
from artifacts.keys import artifact_key, code_fingerprint, file_sha256, is_key
from artifacts.manifest import Manifest
from artifacts.models import download, parse_hf, pull, upload
from artifacts.store import Store
from model.errors import InputError

IMPORT_CODE = ("model.hf.importer", "model.hf.mapping", "model.hf.template")
# what a transformers model repo needs of the Hub (weights, config, tokenizer); never pickles
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json"]


def export_checkpoint(store: Store, ref: str, out_dir: Path, repo_name: str | None = None) -> dict:
    """Export the checkpoint `ref` names (a ref, key, or hf:// artifact) into `out_dir` with its model card."""
    from artifacts.model_card import model_card
    from model.hf.export import export
    from tasks.runner import code_version

    key = pull(ref, store)
    m = store.get(key)
    if m.kind != "checkpoint":
        raise InputError(f"{ref} is a {m.kind} artifact ({m.stage}), not a checkpoint: export a model, e.g. sft/latest")
    card = model_card(store, key, repo_name=repo_name)
    return export(store.local_path(key), out_dir, card, provenance={"key": key, "version": code_version()})


def cmd_export(args) -> int:
    store = Store(args.store)
    info = export_checkpoint(store, args.ref, Path(args.out_dir))
    kind = "chat model" if info["chat"] else "base model"
    print(f"chatforge export: wrote {info['dir']} ({info['stage']} checkpoint, {kind}, {info['parameters']:,} parameters): "
          f"{', '.join(info['files'])}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({info['dir']!r}) and AutoTokenizer.from_pretrained(...)")
    return 0


def push_transformers(store: Store, ref: str, target: str, private: bool = False) -> str:
    hf = parse_hf(target)
    if hf is None:
        raise StoreError(f"push target {target!r} must look like hf://org/repo")
    with tempfile.TemporaryDirectory(dir=_scratch(store)) as tmp:
        info = export_checkpoint(store, ref, Path(tmp) / "model", repo_name=hf[0])
        return upload(Path(info["dir"]), target, f"chatforge export of {ref}", private)


def import_model(store: Store, source: str, stage: str | None = None, name: str | None = None,
                 log=print) -> tuple[str, str, dict]:
    """Import a transformers nanochat model (a directory or hf://org/repo[@rev]) as a checkpoint; (key, ref, what the
    conversion found: stage, step, model config, notes)."""
    from model.hf.importer import to_checkpoint

    ref = f"import/{name or _ref_name(source)}"
    if not re.fullmatch(r"import/[\w.-]+", ref):
        raise InputError(f"bad --name {name!r}: use letters, digits, '-', '_' and '.' only")
    model_dir, origin = _fetch(store, source)
    with tempfile.TemporaryDirectory(dir=_scratch(store)) as tmp:
        out = Path(tmp) / "checkpoint"
        found = to_checkpoint(model_dir, out, stage)
        files = {p.relative_to(out).as_posix(): file_sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
        for note in found["notes"]:
            log(f"chatforge import: note: {note}")
        original = _original(store, found["exported_from"], files)
        if original is not None:  # our own export coming back: it is that artifact, lineage and all
            log(f"chatforge import: identical to the checkpoint it was exported from, {original[:12]}: nothing to add")
            store.set_ref(ref, original)
            return original, ref, found
        key = artifact_key("import", {"files": files}, {}, "")
        source_files = {p.name: file_sha256(p) for p in sorted(model_dir.iterdir()) if p.is_file()}
        config = {**origin, "source_files": source_files, "as_stage": found["stage"], "step": found["step"],
                  "exported_from": found["exported_from"], "notes": found["notes"]}
        with store.lock(key):
            if store.manifest(key) is None:  # the same content imported before keeps its first provenance
                _commit(store, key, out, files, config, found)
    store.set_ref(ref, key)
    return key, ref, found


def _original(store: Store, key: str | None, files: dict[str, str]) -> str | None:
    """`key` (the artifact a chatforge export came from) when this store holds it with exactly these checkpoint files."""
    if not is_key(key):
        return None
    try:
        m = store.manifest(key)
    except StoreError:  # a damaged original: the import stands on its own
        return None
    if m is None or m.kind != "checkpoint":
        return None
    same = all(m.files.get(rel, {}).get("sha256") == sha for rel, sha in files.items())
    return key if same else None


def _commit(store: Store, key: str, out: Path, files: dict, config: dict, found: dict) -> None:
    from tasks.runner import code_version

    with store.staging(key) as staging:
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(out / rel, staging / rel)
        store.commit(staging, Manifest(
            key=key, kind="checkpoint", stage="import", config=config, parents={},
            code={"fingerprint": code_fingerprint(IMPORT_CODE), "version": code_version()},
            metrics={"params": found["params"]}))  # the training stages' name: the model card reads it


def cmd_import(args) -> int:
    store = Store(args.store)
    key, ref, found = import_model(store, args.source, stage=args.stage, name=args.name,
                                   log=lambda s: print(s, file=sys.stderr))
    stage = found["stage"]
    print(f"chatforge import: {args.source} → {key[:12]} ({stage} checkpoint, {found['params']:,} "
          f"parameters), ref {ref}")
    nxt = {"base": "mid", "mid": "sft", "sft": "rl"}.get(stage)
    print(f"next: chatforge chat --model {ref}  ·  chatforge stage chat_eval_{stage} --input {stage}={ref}"
          + (f"  ·  chatforge stage {nxt} --input {stage}={ref}" if nxt else ""))
    return 0


def _fetch(store: Store, source: str) -> tuple[Path, dict]:
    """A local model directory for `source` and the provenance of where it came from."""
    hf = parse_hf(source)
    if hf is None:
        path = Path(source).expanduser()
        if not path.exists():
            raise InputError(f"{source} does not exist: pass a transformers model directory or hf://org/repo[@rev]")
        return path.resolve(), {"source": str(path.resolve())}
    repo, rev = hf
    snap = download(source, store, allow_patterns=HUB_FILES)
    return snap, {"source": source, "repo": repo, "revision": rev or "main", "commit": snap.name}


def _ref_name(source: str) -> str:
    hf = parse_hf(source)
    raw = hf[0].replace("/", "--") if hf else Path(source).expanduser().resolve().name
    return re.sub(r"[^\w.-]+", "-", raw).strip("-.") or "model"


def _scratch(store: Store) -> Path:
    path = store.local_root / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path
