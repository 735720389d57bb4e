"""`base` stage: pretrain the GPT (model/train_base.py), in this process's child or under torchrun."""
from __future__ import annotations

from model.config import BaseConfig

from .launch import launch
from .stage import StageContext, StageDef


def compute(cfg: BaseConfig, ctx: StageContext) -> dict:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "dataset_dir": str(ctx.inputs["data"]),
        "tokenizer_dir": str(ctx.inputs["tokenizer"]),
        "out_dir": str(ctx.out_dir),
        "wip_dir": str(ctx.wip_dir),
    }
    metrics = launch("model.train_base", spec, ctx.wip_dir / "launch", nproc=cfg.nproc, log=ctx.log)
    ctx.device.update(type=metrics["device_type"], count=metrics["world_size"], nodes=1)
    return metrics


STAGE = StageDef(
    name="base", kind="checkpoint", section="base", inputs=("data", "tokenizer"),
    code=("model.train_base", "model.gpt", "model.optim", "model.loader", "model.bpb", "model.checkpoint",
          "model.runtime", "model.tokenizer"),
    compute=compute,
    describe="Pretrain the GPT (Muon + AdamW); val bits-per-byte curve, samples, tokens/s, MFU.",
)
