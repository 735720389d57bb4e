"""`mid` stage: mid-training of the base checkpoint on the mid conversations (model/train/mid.py), in this
process's child or under torchrun."""
from __future__ import annotations

from model.config import MidConfig

from .launch import CHECKPOINT_FILES, launch
from .stage import StageContext, StageDef


def compute(cfg: MidConfig, ctx: StageContext) -> dict:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "checkpoint_dir": str(ctx.inputs["base"]),
        "data_dir": str(ctx.inputs["mid_data"]),
        "out_dir": str(ctx.out_dir),
        "wip_dir": str(ctx.wip_dir),
    }
    metrics = launch("model.train.mid", spec, ctx.wip_dir / "launch", nproc=cfg.nproc, log=ctx.log,
        timeout_minutes=cfg.timeout_minutes, limit_name="mid.timeout_minutes", expect=CHECKPOINT_FILES)
    ctx.device.update(type=metrics["device_type"], count=metrics["world_size"], nodes=1)
    return metrics


STAGE = StageDef(
    name="mid", kind="checkpoint", section="mid", inputs=("base", "mid_data"),
    code=("model.train.mid", "model.train.finetune", "model.train.common", "model.train.runtime", "model.data.chat_loader",
          "model.chat.conversation", "model.nn.gpt", "model.nn.optim", "model.nn.checkpoint", "model.nn.load",
          "model.data.tokenizer"),
    compute=compute,
    describe="Mid-train the base checkpoint on packed conversations (chat format, tools, multiple choice); val loss and bits-per-byte.",
)
