"""What the conversation-training stages (mid, sft) share beyond model/train/common.py: the loss over the
targets that count, the val loss / bits-per-byte pass, the stage's data streams, the gathered loader states,
and a few chat samples for the committed artifact."""
from __future__ import annotations

import math

import torch

from model.chat.conversation import render_for_completion
from model.errors import InputError

# Fixed chat prompts sampled (greedy) at the end of mid and sft, into samples.json.
CHAT_PROMPTS = [
    "Hi! Who are you?",
    "What is the capital of France?",
    "What is 12 + 30?",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
]


def mean_loss(fwd, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that count (y ≥ 0); 0 (no gradient) when none does, never NaN."""
    losses = fwd(x, y, loss_reduction="none")
    return losses.sum() / (y >= 0).sum().clamp(min=1)


@torch.no_grad()
def evaluate(model, batches, token_bytes: torch.Tensor, rt) -> dict:
    """Val loss (mean nats per counted target) and bits per byte (nats over targets with bytes / (ln 2 · bytes),
    as model/evals/bpb.py), summed over ranks: every rank returns the same figures; None when no target counted."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # nats, targets, nats of byte targets, bytes
    token_bytes = token_bytes.to(rt.device)
    for x, y in batches:
        with rt.autocast():
            loss = model(x, y, loss_reduction="none").float()
        valid = y >= 0
        b = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        sums += torch.stack([(loss * valid).sum(dtype=torch.float64), valid.sum(dtype=torch.float64),
                             (loss * (b > 0)).sum(dtype=torch.float64), b.sum(dtype=torch.float64)])
    rt.all_reduce_sum(sums)
    model.train(was_training)
    nats, count, byte_nats, nbytes = sums.tolist()
    return {"loss": nats / count if count else None, "bpb": byte_nats / (math.log(2) * nbytes) if nbytes else None}


def streams(per_step: int, per_stream: int, world_size: int, what: str) -> int:
    """The data streams of one step: per_step / per_stream, a whole number that the processes share evenly."""
    if per_step % per_stream or (per_step // per_stream) % world_size:
        raise InputError(f"{what} must be a whole multiple of {world_size} (the processes, nproc): "
                         "change one of them so it divides")
    return per_step // per_stream


def gather_states(rt, states: dict) -> dict:
    """Every rank's loader states (stream → state), merged on every rank."""
    if rt.distributed:
        gathered = [None] * rt.world_size
        torch.distributed.all_gather_object(gathered, states)
        states = {k: v for part in gathered for k, v in part.items()}
    return states


def chat_samples(model, tok, max_tokens: int) -> list[dict]:
    """Greedy replies to CHAT_PROMPTS, stopped at <|assistant_end|>."""
    end = tok.special_id("<|assistant_end|>")
    budget = min(max_tokens, model.config.sequence_len // 2)
    was_training = model.training
    model.eval()
    out = []
    for prompt in CHAT_PROMPTS:
        ids = render_for_completion([{"role": "user", "content": prompt}], tok, max_tokens=model.config.sequence_len - budget)
        reply = []
        for t in model.generate(ids, max_tokens=budget, temperature=0.0):
            if t == end:
                break
            reply.append(t)
        out.append({"prompt": prompt, "reply": tok.decode(reply)})
    model.train(was_training)
    return out
