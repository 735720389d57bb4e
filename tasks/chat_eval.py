"""`chat_eval` stage: ARC-E/C, MMLU, GSM8K, HumanEval, SpellingBee and ChatCORE of a checkpoint (model/evals/chat_eval.py).

Only the base checkpoint exists so far, so that is what it evaluates (a base model has not learnt the chat
format, so expect scores near the baselines); the mid/sft/rl stages will become its input when they exist.
"""
from __future__ import annotations

from model.config import ChatEvalConfig

from .launch import launch
from .stage import StageContext, StageDef


def compute(cfg: ChatEvalConfig, ctx: StageContext) -> dict:
    spec = {
        "config": cfg.model_dump(mode="json"),
        "checkpoint_dir": str(ctx.inputs[cfg.checkpoint]),
        "evalset_dir": str(ctx.inputs["chat_evalset"]),
        "out_dir": str(ctx.out_dir),
    }
    metrics = launch("model.evals.chat_eval", spec, ctx.wip_dir / "launch", nproc=cfg.nproc, log=ctx.log)
    ctx.device.update(type=metrics["device_type"], count=metrics["world_size"], nodes=1)
    value = metrics["score"]
    ctx.log(f"chat_eval: {metrics['score_name']} {value:.4f}" if value is not None else "chat_eval: no chat set available")
    return metrics


STAGE = StageDef(
    name="chat_eval", kind="eval", section="chat_eval", inputs=("base", "chat_evalset"),
    code=("model.evals.chat_eval", "model.evals.chat_tasks", "model.evals.core_tasks", "model.evals.evalsets", "model.evals.sandbox", "model.chat.engine",
          "model.chat.conversation", "model.nn.load", "model.nn.gpt", "model.train.runtime", "model.data.tokenizer", "model.chat.calculator"),
    compute=compute, reports=("report.md",), tables=("chat_table.json",),
    describe="Chat tasks (lettered MC by letter logits; GSM8K, HumanEval in a sandbox, SpellingBee by greedy generation) and ChatCORE.",
)
