"""`decontam` stage: which eval items share an n-gram with the training text (model/data/decontam.py)."""
from __future__ import annotations

from model.config import DecontamConfig

from .stage import StageContext, StageDef


def compute(cfg: DecontamConfig, ctx: StageContext) -> dict:
    from model.data.decontam import run

    evalsets = {name: ctx.inputs[name] for name in ("core_evalset", "chat_evalset")}
    return run(cfg.n, cfg.min_words, cfg.max_train_chars, ctx.inputs["data"], evalsets, ctx.out_dir, log=ctx.log)


STAGE = StageDef(
    name="decontam", kind="report", section="decontam", inputs=("data", "core_evalset", "chat_evalset"),
    code=("model.data.decontam", "model.data.dataset", "model.evals.evalsets"), compute=compute, reports=("decontam.md",),
    describe="13-gram overlap between the train split and every eval set, reported per set.",
)
