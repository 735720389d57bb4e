"""A checkpoint artifact → a transformers `nanochat` model directory that `AutoModelForCausalLM` loads with no
remote code (and mlx-lm / vLLM, which read the same layout).

Files: config.json, generation_config.json, model.safetensors (fp32, transformers' names), tokenizer.json +
tokenizer_config.json + chat_template.jinja (model/hf/template.py), README.md (the model card the caller made
from the artifact's lineage). The directory is written beside its destination and renamed into place, so a
failed export leaves no half-written model behind. Needs safetensors and tokenizers only.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from model.chat.conversation import CHAT_TEMPERATURE, CHAT_TOP_K
from model.data.tokenizer import Tokenizer
from model.errors import InputError
from model.hf import mapping
from model.hf.template import read_tokenizer, write_tokenizer_files

CHAT_SAMPLING = {"do_sample": True, "temperature": CHAT_TEMPERATURE, "top_k": CHAT_TOP_K}


def read_checkpoint(artifact_dir: Path) -> tuple[dict, Tokenizer]:
    """(model.json, tokenizer) of a checkpoint artifact directory, or a one-line InputError."""
    artifact_dir = Path(artifact_dir)
    try:
        meta = json.loads((artifact_dir / "model.json").read_text())
        meta["model"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{artifact_dir} is not a checkpoint artifact (no readable model.json): export a base, mid, "
                         "sft or rl checkpoint (e.g. sft/latest)") from None
    return meta, read_tokenizer(artifact_dir / "tokenizer")


def export(artifact_dir: Path, out_dir: Path, card: str, provenance: dict | None = None) -> dict:
    """Write the transformers directory `out_dir` (absent or empty) for the checkpoint at `artifact_dir`; returns
    a summary (files, parameters, whether it is a chat model)."""
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} exists and is not an empty directory: choose a new directory or remove it")
    meta, tok = read_checkpoint(artifact_dir)
    model, stage = meta["model"], meta.get("stage", "base")
    chat = stage != "base"
    try:
        tensors = load_file(str(artifact_dir / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{artifact_dir}/model.safetensors is unreadable ({e}): run `chatforge artifacts verify`") from None
    weights = mapping.to_hf(tensors, model)
    bos, end = tok.bos_id, tok.special_id("<|assistant_end|>")
    eos = end if chat else bos
    config = mapping.hf_config(model, bos_id=bos, eos_id=eos, pad_id=bos,
                               provenance={**(provenance or {}), "stage": stage, "step": meta.get("step")})
    generation = {"bos_token_id": bos, "eos_token_id": [end, bos] if chat else bos, "pad_token_id": bos,
                  **(CHAT_SAMPLING if chat else {})}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _json(tmp / "config.json", config)
        _json(tmp / "generation_config.json", generation)
        write_tokenizer_files(artifact_dir / "tokenizer", tmp, chat=chat, model_max_length=model["sequence_len"])
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir()), "chat": chat, "stage": stage,
            "parameters": int(sum(w.size for w in weights.values()))}


def _json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
