"""A transformers `nanochat` model directory → a checkpoint artifact directory (model.safetensors in our names,
model.json, tokenizer/), the layout every chatforge stage and command reads.

Everything is checked before anything is written: the directory holds a nanochat config.json whose features our
GPT has (model/hf/mapping.py lists what differs), a byte-level BPE tokenizer.json with our special tokens, and
weights (one model.safetensors or shards with an index) of exactly the config's shapes. Weights are read with
safetensors (never pickle) and stored in fp32, the format our training writes.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_numpy

from model.data.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE, token_byte_lengths
from model.errors import InputError
from model.hf import mapping
from model.hf.template import read_tokenizer
from model.nn.gpt import GPTConfig
from model.progress import progress
from model.train.common import commit

STAGES = ("base", "mid", "sft", "rl")
INDEX = "model.safetensors.index.json"
PROGRESS_BYTES = 256 << 20  # smaller models read in a moment: no bar


def read_config(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir} is not a directory: pass a transformers model directory or hf://org/repo")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{model_dir} is not a transformers model (no config.json): pass the directory that "
                         "save_pretrained or `chatforge export` wrote") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}/config.json is unreadable ({type(e).__name__}): re-download the model") from None
    if not isinstance(config, dict):
        raise InputError(f"{model_dir}/config.json is not a JSON object: re-download the model")
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of the model: model.safetensors, or the shards its index names."""
    single, index = model_dir / "model.safetensors", model_dir / INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{index} is unreadable: re-download the model") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise InputError(f"{model_dir} lacks weight shards {', '.join(missing[:3])}: download the whole model")
        return [model_dir / s for s in shards]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise InputError(f"{model_dir} has only pickled weights (.bin/.pt), which chatforge never unpickles: "
                         "save the model with safe_serialization (model.safetensors)")
    raise InputError(f"{model_dir} has no weights (model.safetensors or {INDEX}): pass the complete model directory")


def read_weights(files: list[Path]) -> dict:
    """Every tensor of the safetensors files as fp32 numpy arrays (bf16/fp16 weights are widened). A bar over the
    bytes read for a model large enough to take a while (a d32 is gigabytes)."""
    out = {}
    total = sum(p.stat().st_size for p in files)
    with progress(total=total, unit="B", unit_scale=True, desc="import: weights read", disable=total < PROGRESS_BYTES) as bar:
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_tensor(name)
                        bar.update(tensor.numel() * tensor.element_size())
                        out[name] = tensor.to(torch.float32).numpy()
            except (SafetensorError, OSError, RuntimeError) as e:
                raise InputError(f"{path} is not a readable safetensors file ({e}): re-download the model") from None
    return out


def to_checkpoint(model_dir: Path, out_dir: Path, stage: str | None = None) -> dict:
    """Write the checkpoint artifact files for the transformers model at `model_dir` into the empty `out_dir`.
    `stage`: which of our checkpoints it stands in for (decides what trains from it: mid takes a base one);
    default: the stage a chatforge export recorded, else base. Returns what the import found (for provenance)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    tok = read_tokenizer(model_dir)
    ours, notes = mapping.our_config(config, tok.vocab_size)
    GPTConfig.from_dict(ours)  # our own checks of the sizes
    files = weight_files(model_dir)
    weights = mapping.from_hf(read_weights(files), ours)
    recorded = config.get("chatforge") if isinstance(config.get("chatforge"), dict) else {}
    stage = stage or recorded.get("stage") or "base"
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}: pass --stage with one of {', '.join(STAGES)}")
    step = recorded.get("step") if isinstance(recorded.get("step"), int) else 0
    try:
        byte_lengths = token_byte_lengths(tok._hf)
    except AssertionError:
        raise InputError(f"{model_dir}/{TOKENIZER_FILE} is not a byte-level BPE: chatforge's tokenizer maps every "
                         "token to bytes; convert the tokenizer first") from None
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        shutil.copyfile(model_dir / TOKENIZER_FILE, tok_dir / TOKENIZER_FILE)
        save_numpy({"token_bytes": byte_lengths}, str(tok_dir / TOKEN_BYTES_FILE))
        commit(out_dir, {k: torch.from_numpy(v) for k, v in weights.items()}, ours, stage, step, tok_dir)
    return {"stage": stage, "step": step, "model": ours, "params": int(sum(w.size for w in weights.values())),
            "notes": notes, "exported_from": recorded.get("key"), "weight_files": [p.name for p in files]}
