"""`core_evalset` and `chat_evalset` stages: eval items as hashed artifacts (model/evals/evalsets.py)."""
from __future__ import annotations

from model.config import ChatEvalsetConfig, CoreEvalsetConfig
from model.evals.evalsets import build_chat, build_core, chat_fingerprint, core_fingerprint

from .stage import StageContext, StageDef


def _core(cfg: CoreEvalsetConfig, ctx: StageContext) -> dict:
    return build_core(cfg, ctx.out_dir, ctx.download_dir, log=ctx.log)


def _chat(cfg: ChatEvalsetConfig, ctx: StageContext) -> dict:
    return build_chat(cfg, ctx.out_dir, ctx.download_dir, log=ctx.log)


CORE = StageDef(
    name="core_evalset", kind="evalset", section="core_evalset", inputs=(),
    code=("model.evals.evalsets", "model.data.pypi", "model.evals.core_tasks"), compute=_core, fingerprint=core_fingerprint,
    describe="The DCLM CORE task files (local directory or the bundle URL), hashed; missing tasks recorded as unavailable.",
)
CHAT = StageDef(
    name="chat_evalset", kind="evalset", section="chat_evalset", inputs=(),
    code=("model.evals.evalsets", "model.data.pypi", "model.data.sources", "model.evals.chat_tasks"), compute=_chat, fingerprint=chat_fingerprint,
    describe="ARC-E/C, MMLU, GSM8K, HumanEval (Hub, pinned PyPI or local files) and synthetic SpellingBee, normalized and hashed.",
)
