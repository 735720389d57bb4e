"""`core_evalset` and `chat_evalset` stages: eval items as hashed artifacts (model/evals/evalsets.py)."""
from __future__ import annotations

from model.config import ChatEvalsetConfig, CoreEvalsetConfig
from model.evals.evalsets import EVAL_DIR_ENV, build_chat, build_core, chat_fingerprint, core_fingerprint

from .stage import StageContext, StageDef


def _core(cfg: CoreEvalsetConfig, ctx: StageContext) -> dict:
    return build_core(cfg, ctx.out_dir, ctx.download_dir, log=ctx.log)


def _chat(cfg: ChatEvalsetConfig, ctx: StageContext) -> dict:
    return build_chat(cfg, ctx.out_dir, ctx.download_dir, log=ctx.log)


CORE = StageDef(
    name="core_evalset", kind="evalset", section="core_evalset", inputs=(),
    code=("model.evals.evalsets", "model.data.pypi", "model.evals.core_tasks"), compute=_core, fingerprint=core_fingerprint,
    missing_data_hint=f"{EVAL_DIR_ENV}=DIR with DIR/core/<task>.jsonl (the DCLM task files), "
    "or --set core_evalset.local_dir=DIR, or --set core_evalset.url=URL (the DCLM bundle zip; the real presets' default)",
    describe="The DCLM CORE task files (local directory or the bundle URL), hashed; missing tasks recorded as unavailable.",
)
CHAT = StageDef(
    name="chat_evalset", kind="evalset", section="chat_evalset", inputs=(),
    code=("model.evals.evalsets", "model.data.pypi", "model.data.sources", "model.evals.chat_tasks"), compute=_chat, fingerprint=chat_fingerprint,
    missing_data_hint=f"{EVAL_DIR_ENV}=DIR with arc_easy.jsonl, arc_challenge.jsonl, mmlu_test.jsonl, gsm8k_test.jsonl, "
    "humaneval.jsonl (or the Hub's parquet layout), or --set chat_evalset.local_dir=DIR, "
    "or --set chat_evalset.source=hub (pypi: MMLU, HumanEval and GSM8K offline)",
    describe="ARC-E/C, MMLU, GSM8K, HumanEval (Hub, pinned PyPI or local files) and synthetic SpellingBee, normalized and hashed.",
)
