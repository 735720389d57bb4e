"""Input-addressed artifact keys.

A key is the sha256 of canonical JSON of what determines a stage's output: the stage name, its
normalized config, the keys of its inputs and a fingerprint of the code that computes it. Paths,
hosts and timestamps never enter a key, so the same work has the same key on every machine.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path


_KEY = re.compile(r"[0-9a-f]{64}")


def is_key(value) -> bool:
    """Whether `value` is written as a key is: 64 lowercase hex digits."""
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=None)
def _module_file(module: str) -> Path:
    # find_spec imports only parent packages (cheap, torch-free), never the module itself
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"code fingerprint: module {module!r} not found")
    return Path(spec.origin)


def code_fingerprint(modules: list[str] | tuple[str, ...]) -> str:
    """sha256 over the source of the modules that compute a stage (names sorted, so order is irrelevant)."""
    h = hashlib.sha256()
    for module in sorted(set(modules)):
        h.update(module.encode() + b"\0")
        h.update(_module_file(module).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def artifact_key(stage: str, config: dict, inputs: dict[str, str], code: str) -> str:
    payload = {"stage": stage, "config": config, "inputs": dict(sorted(inputs.items())), "code": code}
    return sha256_hex(canonical_json(payload).encode())


def stream_sha256(f, chunk: int = 1 << 20) -> str:
    """sha256 of an open binary file object, read in chunks (any fsspec file works)."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)
