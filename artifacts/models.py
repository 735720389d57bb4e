"""Model references → verified local directories, and Hub push/pull of artifacts.

A reference is a key (or unique prefix), a ref (`base/latest`, `base/tiny`), or `hf://org/repo[@rev]`.
A Hub repo pushed by chatforge holds the artifact's files and its manifest.json; a pull downloads the
snapshot with `huggingface_hub`, checks every file against the manifest (size and sha256) and commits
it into the store under its own key, so lineage and refs work as for anything computed locally.
The Hub token comes from the environment (HF_TOKEN, read by huggingface_hub) and is never logged.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .errors import ArtifactCorrupt, StoreError
from .keys import file_sha256
from .manifest import Manifest
from .store import Store

_HF = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def parse_hf(ref: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) for `hf://org/repo[@rev]`, None for other references; malformed → StoreError."""
    if not ref.startswith("hf://"):
        return None
    m = _HF.match(ref)
    if not m:
        raise StoreError(f"bad Hub reference {ref!r}: write it as hf://org/repo or hf://org/repo@revision")
    return m["repo"], m["rev"]


# The chat models, newest stage first: what `chatforge chat` and `serve` talk to when no --model is given.
CHAT_MODELS = ("rl", "sft", "mid", "base")


def default_model(store: Store) -> str:
    """The ref of the newest chat model in the store (rl, else sft, else mid, else base): `<stage>/latest`."""
    refs = store.refs()
    for stage in CHAT_MODELS:
        if f"{stage}/latest" in refs:
            return f"{stage}/latest"
    raise StoreError(f"no trained model in {store.url}: run `chatforge run --preset tiny` first, or pass --model REF")


def pick_model(ref: str | None, store: Store, log=None) -> str:
    """`ref`, or when it is None the newest chat model (`default_model`), announced through `log`."""
    if ref is not None:
        return ref
    ref = default_model(store)
    if log is not None:
        log(f"chatforge: no --model given: using {ref} ({store.resolve(ref)[:12]}), the newest chat model in {store.url}")
    return ref


def resolve_model(ref: str, store: Store) -> Path:
    """A local, verified directory holding the artifact `ref` names (pulled from the Hub if need be)."""
    if parse_hf(ref):
        return store.local_path(pull(ref, store))
    return store.local_path(store.resolve(ref))


def pull(ref: str, store: Store) -> str:
    """Download an `hf://` artifact into the store (verified), or check a local one; returns its key."""
    hf = parse_hf(ref)
    if hf is None:
        key = store.resolve(ref)
        problems = store.verify(key)
        if problems:
            raise ArtifactCorrupt(f"artifact {key[:12]} is corrupt: {problems[0]}: run `chatforge artifacts verify` and recompute it")
        store.local_path(key)
        return key
    repo, rev = hf
    snap = download(ref, store)
    try:
        m = Manifest.from_dict(json.loads((snap / "manifest.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        if (snap / "config.json").is_file():
            raise StoreError(f"{ref} is a transformers model, not a chatforge artifact: `chatforge import {ref}` reads a "
                             "nanochat one into the store") from None
        raise StoreError(f"{ref} is not a chatforge artifact (no valid manifest.json): push one with `chatforge artifacts push`") from None
    for rel, info in m.files.items():
        path = snap / rel
        if not path.is_file() or path.stat().st_size != info["size"] or file_sha256(path) != info["sha256"]:
            raise ArtifactCorrupt(f"{ref}: {rel} does not match its manifest (size or sha256): the download is corrupt; retry")
    if store.manifest(m.key) is None:
        with store.lock(m.key):
            with store.staging(m.key) as tmp:
                for rel in m.files:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(snap / rel, tmp / rel)
                store.commit(tmp, m)
    store.set_ref(f"{m.stage}/{repo.replace('/', '--')}", m.key)
    return m.key


def download(ref: str, store: Store, allow_patterns: list[str] | None = None) -> Path:
    """The local snapshot of the Hub repo `hf://org/repo[@rev]` (only `allow_patterns` of it, when given), in the
    store's download cache; a one-line StoreError when it cannot be had."""
    repo, rev = parse_hf(ref)
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(huggingface_hub.snapshot_download(repo, revision=rev, cache_dir=store.local_root / "hub",
                                                      allow_patterns=allow_patterns))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise StoreError(f"could not download {ref} ({type(e).__name__}): check the repo name, HF_TOKEN for private repos, "
                         "and network access") from None


def push(ref: str, target: str, store: Store, private: bool = False) -> str:
    """Upload an artifact (files + manifest) to `hf://org/repo`; returns the commit URL."""
    key = store.resolve(ref)
    problems = store.verify(key)
    if problems:
        raise ArtifactCorrupt(f"refusing to push corrupt artifact {key[:12]}: {problems[0]}")
    return upload(store.local_path(key), target, f"chatforge artifact {key[:12]}", private)


def upload(folder: Path, target: str, message: str, private: bool = False) -> str:
    """Upload a local directory as the model repo `hf://org/repo[@rev]` (created when missing); the commit URL."""
    hf = parse_hf(target)
    if hf is None:
        raise StoreError(f"push target {target!r} must look like hf://org/repo")
    repo, rev = hf
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), revision=rev, commit_message=message)
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise StoreError(f"could not push to {target} ({type(e).__name__}): check HF_TOKEN (write access) and network access") from None
    return str(getattr(info, "commit_url", info))
