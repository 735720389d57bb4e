"""Load a trained checkpoint artifact (weights + model.json + tokenizer/) for inference."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model.nn.checkpoint import WEIGHTS, load_weights
from model.errors import InputError
from model.nn.gpt import GPT, GPTConfig
from model.data.tokenizer import Tokenizer


def load_model(artifact_dir: Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    artifact_dir = Path(artifact_dir)
    try:
        meta = json.loads((artifact_dir / "model.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{artifact_dir} is not a model checkpoint (model.json: {e}): pass a checkpoint artifact (the base stage's, e.g. base/latest)") from None
    tok = Tokenizer.load(artifact_dir / "tokenizer")
    cfg = GPTConfig.from_dict(meta["model"])
    if cfg.vocab_size != tok.vocab_size:
        raise InputError(
            f"checkpoint vocab {cfg.vocab_size} does not match its tokenizer's {tok.vocab_size}: the artifact is inconsistent; re-pull it"
        )
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()  # rebuilds non-persistent buffers (rotary tables); weights are overwritten next
    load_weights(model, artifact_dir / WEIGHTS)
    model.eval()
    return model, tok
