"""The stages that exist, in DAG order. A stage not listed here is not in the flow."""
from __future__ import annotations

from . import base, base_eval, chat_eval, data, decontam, evalsets, tokenizer
from .stage import StageDef

# Eval sets come before training so that a missing or broken download fails in seconds, not after hours.
STAGES: list[StageDef] = [
    data.STAGE, evalsets.CORE, evalsets.CHAT, decontam.STAGE,
    tokenizer.STAGE, base.STAGE, base_eval.STAGE, chat_eval.STAGE,
]
BY_NAME: dict[str, StageDef] = {s.name: s for s in STAGES}


def get(name: str) -> StageDef:
    if name not in BY_NAME:
        raise KeyError(f"unknown stage {name!r}: the stages are {', '.join(BY_NAME)}")
    return BY_NAME[name]
