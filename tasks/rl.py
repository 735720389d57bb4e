"""`rl` stage: REINFORCE with a group-mean baseline, on-policy, no KL (model/train/rl.py), from the sft
checkpoint on the `rl_data` problems, in this process's child or under torchrun."""
from __future__ import annotations

from model.config import RlConfig

from .launch import CHECKPOINT_FILES, launch
from .stage import StageContext, StageDef


def compute(cfg: RlConfig, ctx: StageContext) -> dict:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "checkpoint_dir": str(ctx.inputs["sft"]),
        "data_dir": str(ctx.inputs["rl_data"]),
        "out_dir": str(ctx.out_dir),
        "wip_dir": str(ctx.wip_dir),
    }
    metrics = launch("model.train.rl", spec, ctx.wip_dir / "launch", nproc=cfg.nproc, log=ctx.log,
        timeout_minutes=cfg.timeout_minutes, limit_name="rl.timeout_minutes", expect=CHECKPOINT_FILES)
    ctx.device.update(type=metrics["device_type"], count=metrics["world_size"], nodes=1)
    return metrics


STAGE = StageDef(
    name="rl", kind="checkpoint", section="rl", inputs=("sft", "rl_data"),
    code=("model.train.rl", "model.train.common", "model.train.runtime", "model.nn.gpt", "model.nn.optim",
          "model.nn.checkpoint", "model.nn.load", "model.chat.engine", "model.chat.calculator",
          "model.chat.conversation", "model.evals.chat_tasks", "model.data.tokenizer"),
    compute=compute,
    describe="REINFORCE with a group-mean baseline, on-policy, no KL, on problems with checkable answers; "
             "mean reward and pass@1..k curves, samples/s.",
)
