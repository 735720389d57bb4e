"""Continuous batching: requests join a running batch at the next decoding step and leave it when they end.

`Batcher` drives one `Engine`'s model over one KV cache of up to `max_batch` rows. `add` runs a new request's
prefill on its own (a one-row cache, exactly as `Engine.generate([prompt])` runs it), draws its first token
and moves its cache row into the batch; `step` runs one decoding step for every row in the batch; `remove`
drops a request (its client left) and frees its row. Whoever drives it interleaves the two: a few `add`s,
one `step`, and so on, so a new request waits for at most one step of the others before its prefill.

Exactness. Each request has its own `torch.Generator` seeded with its seed, its own temperature and top_k,
and its tokens go through `Engine.next_token` (stop rules, calculator tool, forced tokens) as in `generate`.
With a batch-invariant engine (the default on CPU, see `model.chat.engine`) a row's logits do not depend on
the other rows, so a request gets exactly the tokens `Engine.generate([prompt], max_tokens, temperature,
top_k, seed)` gives it alone, whoever shares its batch and whenever it joined. Without batch invariance
(CUDA) the tokens follow the same rules but rounding may differ with the batch size.

Not thread-safe: one thread (the server's worker) owns a batcher.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.chat.engine import Engine, _Row


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 42


@dataclass
class Output:
    """One step of one request: its token and mask (None when it ended without one) and whether it has ended."""

    request: Request
    token: int | None
    mask: int | None
    done: bool


@dataclass
class _Slot:
    request: Request
    rng: torch.Generator
    row: _Row = field(default_factory=_Row)
    token: int = 0  # the token to feed at the next step


class Batcher:
    def __init__(self, engine: Engine, max_batch: int = 32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1 (got {max_batch})")
        self.engine, self.max_batch = engine, max_batch
        self.cache = engine.new_cache(0, engine.model.config.sequence_len)
        self.slots: list[_Slot] = []  # slot j is cache row j

    @property
    def active(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.slots)

    @torch.inference_mode()
    def add(self, request: Request) -> Output:
        """Prefill a request and draw its first token; it joins the batch unless that token ends it.
        Raises `model.errors.InputError` for a bad request, like `Engine.generate`."""
        engine, r = self.engine, request
        if self.free <= 0:
            raise RuntimeError("the batch is full: add after a request has ended")
        engine._check([r.prompt], r.max_tokens, r.temperature, 1)
        if r.max_tokens == 0:
            return Output(r, None, None, True)
        rng = engine.generator(r.seed)
        cache, logits = engine.prefill([r.prompt], r.max_tokens)
        slot = _Slot(r, rng)
        out = self._advance(slot, int(engine._sample(logits, r.temperature, r.top_k, rng)[0]))
        if not out.done:
            self.cache.append_row(cache)
            self.slots.append(slot)
        return out

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """One decoding step for every request in the batch; those that end leave it."""
        if not self.slots:
            return []
        engine = self.engine
        feed = torch.tensor([s.token for s in self.slots], dtype=torch.long, device=engine.device)[:, None]
        logits = engine.model.forward_cached(feed, self.cache)
        self.cache.advance(1)
        greedy = logits.argmax(dim=-1).tolist() if any(s.request.temperature == 0 for s in self.slots) else None
        outs = []
        for j, s in enumerate(self.slots):
            r = s.request
            if r.temperature == 0:
                sampled = greedy[j]
            else:  # the row's own generator on its own logits: the same draw as when it runs alone
                sampled = int(engine._sample(logits[j: j + 1], r.temperature, r.top_k, s.rng)[0])
            outs.append(self._advance(s, sampled))
        self._drop([j for j, out in enumerate(outs) if out.done])
        return outs

    @torch.inference_mode()
    def remove(self, request: Request) -> bool:
        """Drop a request from the batch (its client left); False if it is not in it."""
        for j, s in enumerate(self.slots):
            if s.request is request:
                self._drop([j])
                return True
        return False

    @torch.inference_mode()
    def clear(self) -> list[Request]:
        """Drop every request (after a failed step); returns them."""
        dropped = [s.request for s in self.slots]
        self._drop(list(range(len(self.slots))))
        return dropped

    def _advance(self, slot: _Slot, sampled: int) -> Output:
        r = slot.request
        token, mask, done = self.engine.next_token(slot.row, sampled, len(r.prompt), r.max_tokens)
        slot.token = token
        return Output(r, token, mask, done)

    def _drop(self, rows: list[int]) -> None:
        if rows:
            order = self.cache.remove_rows(rows)
            self.slots = [self.slots[j] for j in order]
