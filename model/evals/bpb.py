"""Bits per byte: a tokenizer-independent loss, so models with different vocabularies compare.

bpb = Σ nats over target tokens / (ln 2 · Σ UTF-8 bytes of those tokens); special tokens (0 bytes)
are left out of both sums.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor, rt) -> float:
    """`batches` yields (x, y); sums are all-reduced over ranks so every rank returns the same figure."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=rt.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=rt.device)
    token_bytes = token_bytes.to(rt.device)
    for x, y in batches:
        with rt.autocast():
            loss = model(x, y, loss_reduction="none").float()
        valid = y >= 0
        b = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = b > 0
        nats += (loss * counted).sum(dtype=torch.float64)
        nbytes += b.sum(dtype=torch.float64)
    rt.all_reduce_sum(nats)
    rt.all_reduce_sum(nbytes)
    model.train(was_training)
    if nbytes.item() == 0:
        return float("nan")
    return nats.item() / (math.log(2) * nbytes.item())
