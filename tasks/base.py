"""`base` stage: pretrain the GPT (model/train/base.py), in this process's child or under torchrun."""
from __future__ import annotations

from model.config import BaseConfig

from .launch import CHECKPOINT_FILES, launch
from .stage import StageContext, StageDef


def compute(cfg: BaseConfig, ctx: StageContext) -> dict:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "dataset_dir": str(ctx.inputs["data"]),
        "tokenizer_dir": str(ctx.inputs["tokenizer"]),
        "out_dir": str(ctx.out_dir),
        "wip_dir": str(ctx.wip_dir),
    }
    metrics = launch("model.train.base", spec, ctx.wip_dir / "launch", nproc=cfg.nproc, log=ctx.log,
        timeout_minutes=cfg.timeout_minutes, limit_name="base.timeout_minutes", expect=CHECKPOINT_FILES)
    ctx.device.update(type=metrics["device_type"], count=metrics["world_size"], nodes=1)
    return metrics


STAGE = StageDef(
    name="base", kind="checkpoint", section="base", inputs=("data", "tokenizer"),
    code=("model.train.base", "model.train.common", "model.nn.gpt", "model.nn.optim", "model.data.loader", "model.evals.bpb", "model.nn.checkpoint",
          "model.train.runtime", "model.data.tokenizer"),
    compute=compute,
    describe="Pretrain the GPT (Muon + AdamW); val bits-per-byte curve, samples, tokens/s, MFU.",
)
