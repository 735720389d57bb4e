"""The stages that exist, in DAG order. A stage not listed here is not in the flow."""
from __future__ import annotations

from . import base, base_eval, chat_eval, data, decontam, evalsets, mid, mixtures, report, rl, sft, tokenizer
from .stage import StageDef

# Eval sets and conversation mixtures come before training so that a missing or broken download fails in
# seconds, not after hours; each chat checkpoint is evaluated as soon as it exists; the report card comes last.
STAGES: list[StageDef] = [
    data.STAGE, evalsets.CORE, evalsets.CHAT, decontam.STAGE, tokenizer.STAGE, *mixtures.STAGES,
    base.STAGE, base_eval.STAGE, chat_eval.STAGES["base"],
    mid.STAGE, chat_eval.STAGES["mid"],
    sft.STAGE, chat_eval.STAGES["sft"],
    rl.STAGE, chat_eval.STAGES["rl"],
    report.STAGE,
]
BY_NAME: dict[str, StageDef] = {s.name: s for s in STAGES}


def get(name: str) -> StageDef:
    if name not in BY_NAME:
        raise KeyError(f"unknown stage {name!r}: the stages are {', '.join(BY_NAME)}")
    return BY_NAME[name]
