"""`tokenizer` stage: byte-level BPE on the dataset's train split (model/data/tokenizer.py)."""
from __future__ import annotations

from model.config import TokenizerConfig

from .stage import StageContext, StageDef


def compute(cfg: TokenizerConfig, ctx: StageContext) -> dict:
    from model.data.tokenizer import train

    return train(cfg, ctx.inputs["data"], ctx.out_dir, download_dir=ctx.download_dir)


STAGE = StageDef(
    name="tokenizer", kind="tokenizer", section="tokenizer", inputs=("data",),
    code=("model.data.tokenizer", "model.data.compression", "model.data.dataset"),
    compute=compute,
    describe="Train a byte-level BPE with 9 special tokens; compression vs GPT-2/GPT-4.",
    reports=("compression.md",),
)
