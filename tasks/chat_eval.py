"""`chat_eval_<checkpoint>` stages: ARC-E/C, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE of the base, mid,
sft and rl checkpoints (model/evals/chat_eval.py), one eval artifact each, all with the `chat_eval` config.

The base model has not learnt the chat format, so expect its scores near the baselines: it is the reference
the chat stages are measured against.
"""
from __future__ import annotations

from model.config import ChatEvalConfig

from .launch import EVAL_FILES, launch
from .stage import StageContext, StageDef

CHECKPOINTS = ("base", "mid", "sft", "rl")


def _compute(checkpoint: str):
    def compute(cfg: ChatEvalConfig, ctx: StageContext) -> dict:
        spec = {
            "config": cfg.model_dump(mode="json"),
            "checkpoint": checkpoint,
            "checkpoint_dir": str(ctx.inputs[checkpoint]),
            "evalset_dir": str(ctx.inputs["chat_evalset"]),
            "out_dir": str(ctx.out_dir),
        }
        metrics = launch("model.evals.chat_eval", spec, ctx.wip_dir / "launch", nproc=cfg.nproc, log=ctx.log,
            timeout_minutes=cfg.timeout_minutes, limit_name="chat_eval.timeout_minutes", expect=EVAL_FILES)
        ctx.device.update(type=metrics["device_type"], count=metrics["world_size"], nodes=1)
        value = metrics["score"]
        ctx.log(f"chat_eval {checkpoint}: {metrics['score_name']} {value:.4f}" if value is not None
                else f"chat_eval {checkpoint}: no chat set available")
        return metrics

    return compute


def stage(checkpoint: str) -> StageDef:
    return StageDef(
        name=f"chat_eval_{checkpoint}", kind="eval", section="chat_eval", inputs=(checkpoint, "chat_evalset"),
        code=("model.evals.chat_eval", "model.evals.chat_format", "model.evals.chat_tasks", "model.evals.core_tasks", "model.evals.evalsets",
              "model.evals.sandbox", "model.evals.sandbox_child", "model.evals.sandbox_seccomp", "model.chat.engine", "model.chat.conversation", "model.nn.load", "model.nn.gpt",
              "model.train.runtime", "model.data.tokenizer", "model.chat.calculator"),
        compute=_compute(checkpoint), reports=("report.md",), tables=("chat_table.json",),
        describe=f"Chat tasks of the {checkpoint} checkpoint (lettered MC by letter logits; GSM8K, HumanEval in a "
                 "sandbox, SpellingBee by greedy generation) and ChatCORE.",
    )


STAGES = {c: stage(c) for c in CHECKPOINTS}
