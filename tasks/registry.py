"""The stages that exist, in DAG order. A stage not listed here is not in the flow."""
from __future__ import annotations

from . import base, data, tokenizer
from .stage import StageDef

STAGES: list[StageDef] = [data.STAGE, tokenizer.STAGE, base.STAGE]
BY_NAME: dict[str, StageDef] = {s.name: s for s in STAGES}


def get(name: str) -> StageDef:
    if name not in BY_NAME:
        raise KeyError(f"unknown stage {name!r}: the stages are {', '.join(BY_NAME)}")
    return BY_NAME[name]
