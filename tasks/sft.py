"""`sft` stage: supervised fine-tuning of the mid checkpoint on the SFT conversations (model/train/sft.py), in
this process's child or under torchrun."""
from __future__ import annotations

from model.config import SftConfig

from .launch import CHECKPOINT_FILES, launch
from .stage import StageContext, StageDef


def compute(cfg: SftConfig, ctx: StageContext) -> dict:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "checkpoint_dir": str(ctx.inputs["mid"]),
        "data_dir": str(ctx.inputs["sft_data"]),
        "out_dir": str(ctx.out_dir),
        "wip_dir": str(ctx.wip_dir),
    }
    metrics = launch("model.train.sft", spec, ctx.wip_dir / "launch", nproc=cfg.nproc, log=ctx.log,
        timeout_minutes=cfg.timeout_minutes, limit_name="sft.timeout_minutes", expect=CHECKPOINT_FILES)
    ctx.device.update(type=metrics["device_type"], count=metrics["world_size"], nodes=1)
    return metrics


STAGE = StageDef(
    name="sft", kind="checkpoint", section="sft", inputs=("mid", "sft_data"),
    code=("model.train.sft", "model.train.finetune", "model.train.common", "model.train.runtime", "model.data.chat_loader",
          "model.chat.conversation", "model.nn.gpt", "model.nn.optim", "model.nn.checkpoint", "model.nn.load",
          "model.data.tokenizer"),
    compute=compute,
    describe="Supervised fine-tuning of the mid checkpoint: one conversation per row, loss on assistant tokens; val loss.",
)
