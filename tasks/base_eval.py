"""`base_eval` stage: CORE, train/val bits-per-byte and samples of the base checkpoint (model/evals/base_eval.py)."""
from __future__ import annotations

from model.config import BaseEvalConfig

from .launch import EVAL_FILES, launch
from .stage import StageContext, StageDef


def compute(cfg: BaseEvalConfig, ctx: StageContext) -> dict:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "checkpoint_dir": str(ctx.inputs["base"]),
        "dataset_dir": str(ctx.inputs["data"]),
        "evalset_dir": str(ctx.inputs["core_evalset"]),
        "out_dir": str(ctx.out_dir),
    }
    metrics = launch("model.evals.base_eval", spec, ctx.wip_dir / "launch", nproc=cfg.nproc, log=ctx.log,
        timeout_minutes=cfg.timeout_minutes, limit_name="base_eval.timeout_minutes", expect=EVAL_FILES)
    ctx.device.update(type=metrics["device_type"], count=metrics["world_size"], nodes=1)
    name, value = metrics["score_name"], metrics["score"]
    ctx.log(f"base_eval: {name} {value:.4f}" if value is not None else "base_eval: CORE not run: data unavailable")
    return metrics


STAGE = StageDef(
    name="base_eval", kind="eval", section="base_eval", inputs=("data", "base", "core_evalset"),
    code=("model.evals.base_eval", "model.evals.core_eval", "model.evals.core_tasks", "model.evals.bpb", "model.data.loader", "model.nn.load",
          "model.nn.gpt", "model.train.runtime", "model.data.tokenizer", "model.train.base"),
    compute=compute, reports=("report.md",), tables=("core_table.json",),
    describe="CORE per task (centered accuracy; partial suites named by coverage), train/val bits-per-byte, samples.",
)
