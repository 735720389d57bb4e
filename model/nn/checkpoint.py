"""Resumable training checkpoints: safetensors weights + JSON state + optimizer/RNG tensors.

A checkpoint is a directory `step-NNNNNNNN` inside the stage's work-in-progress area. It is written
as `.tmp-…` and renamed into place, so a directory with that name is always complete; the newest one
wins on resume. Nothing is unpickled beyond `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.errors import InputError

WEIGHTS = "model.safetensors"
STATE = "state.json"
OPTIM = "optim.pt"
PREFIX = "step-"


def save_weights(model: torch.nn.Module | dict, path: Path) -> None:
    """fp32 CPU copy of the state dict, or of a name → tensor dict (contiguous, so safetensors takes it)."""
    state = model if isinstance(model, dict) else model.state_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(path))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"checkpoint {path} is corrupt or unreadable ({e}): delete it so the stage starts over or resumes from an older one") from None
    expected = model.state_dict()
    bad = [k for k in expected if k not in tensors or tensors[k].shape != expected[k].shape]
    if bad:
        got = tensors.get(bad[0])
        raise InputError(
            f"checkpoint {path} does not fit this model ({bad[0]}: {None if got is None else tuple(got.shape)} vs "
            f"{tuple(expected[bad[0]].shape)}): the model config or tokenizer changed; use a matching checkpoint"
        )
    model.load_state_dict({k: tensors[k] for k in expected}, strict=True)


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(wip: Path, step: int, model, optimizers, state: dict, keep: int = 2) -> Path:
    """Write a complete checkpoint atomically; keep only the newest `keep`."""
    tmp = wip / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_weights(model, tmp / WEIGHTS)
    torch.save({"optimizers": [o.state_dict() for o in optimizers], "rng": rng_state()}, tmp / OPTIM)
    write_state(tmp, step, state)
    return publish(tmp, wip, step, keep)


def write_state(ckpt: Path, step: int, state: dict) -> None:
    """The checkpoint's JSON part: its step and the caller's state (loaders, curves, ...)."""
    (ckpt / STATE).write_text(json.dumps({"step": step, **state}, sort_keys=True))


def publish(tmp: Path, wip: Path, step: int, keep: int = 2) -> Path:
    """Make the complete directory `tmp` the checkpoint `step-N`: fsync every file below it, rename it into place,
    keep the newest `keep` checkpoints and drop temporary directories other writers left behind."""
    final = wip / f"{PREFIX}{step:08d}"
    for root, _, files in os.walk(tmp):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(wip.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in wip.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(wip: Path) -> Path | None:
    found = sorted(p for p in wip.glob(f"{PREFIX}*") if p.is_dir()) if wip.exists() else []
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"checkpoint {ckpt} is corrupt or unreadable ({type(e).__name__}): delete it to resume from an older one or start over") from None


def load(ckpt: Path, model, optimizers) -> dict:
    """Restore weights, optimizer and RNG state; return the JSON state (step, loader, loop)."""
    state = read_state(ckpt)
    try:
        blob = torch.load(ckpt / OPTIM, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"checkpoint {ckpt} is corrupt or unreadable ({type(e).__name__}): delete it to resume from an older one or start over") from None
    load_weights(model, ckpt / WEIGHTS)
    if len(blob["optimizers"]) != len(optimizers):
        raise InputError(f"checkpoint {ckpt} holds {len(blob['optimizers'])} optimizers, this run has {len(optimizers)}: start a fresh run")
    for opt, sd in zip(optimizers, blob["optimizers"]):
        opt.load_state_dict(sd)
    set_rng_state(blob["rng"])
    return state
