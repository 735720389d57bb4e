"""Batched sampling with a KV cache and the calculator tool: what chat, evals and RL generate with.

Batching. The rows of a batch are prompts × num_samples (prompt i's samples are rows i·n … i·n + n − 1).
Each distinct prompt is run once (prefill) and its cache is copied to its samples. Prompts of different
lengths are **right-padded** for the prefill, which is then plain causal attention: a real token only sees
earlier positions, all real, so padding never leaks in, and each row's rotary positions start at 0 exactly
as when the prompt is run alone. Row r's next-token logits are read at its own last prompt position.
After the prefill every row has its own length: a decoding step writes each row's new key/value at that
row's position (over the padding, if any) and attends with a per-row mask `key position ≤ query position`,
so padding left in the cache beyond a row's length is never seen.

Cache layout (`KVCache`): per layer, keys and values of shape (rows, n_kv_head, capacity, head_dim), in the
dtype the model computes k/v in (allocated on first use, so autocast works), with per-row lengths. Only the
n_kv_head heads are stored (GQA: attention broadcasts them to the query heads). The capacity is
min(longest prompt + max_tokens, sequence_len). When rows finish they are dropped from the cache, so the
batch shrinks as rows end.

Stopping. A row ends after yielding `<|assistant_end|>` or `<|bos|>`, after `max_tokens` tokens (sampled and
forced alike), or when prompt + generated tokens fill the model's context (`sequence_len`). A prompt of
`sequence_len` tokens or more is an InputError.

Tool use. When a row samples `<|python_start|>`, the engine collects its tokens until `<|python_end|>`,
decodes them and asks `calculator.evaluate`. If there is an answer, the row's next tokens are forced:
`<|output_start|>`, the answer's tokens, `<|output_end|>`, one per step, yielded with mask 0 and fed to the
model like any token; the model's own choice at those steps is ignored. Sampled tokens have mask 1. A
refused expression forces nothing: the model carries on by itself.

Sampling. Temperature 0 is argmax; otherwise logits / temperature, optionally cut to the top_k (None or
≤ 0: no cut), then one multinomial draw per row from a `torch.Generator` on the model's device seeded with
`seed`: the same call gives the same tokens, and rows are drawn independently.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from model.chat import calculator
from model.errors import InputError


class KVCache:
    """Keys/values of every layer for a batch of rows, each row with its own length (see the module doc)."""

    def __init__(self, n_layer: int, batch: int, capacity: int, device: torch.device):
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # tokens stored per row
        self._host_lengths = [0] * batch  # the same on the host, so that no step waits on the device for them
        self._span = 0
        self._pos: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return len(self._host_lengths)

    @property
    def _max_length(self) -> int:
        return max(self._host_lengths, default=0)

    # ------------------------------------------------------------ the interface GPT.forward_cached uses

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the T tokens about to be run, and the attention mask that goes with them."""
        if self._max_length + T > self.capacity:
            raise InputError(f"KV cache of {self.capacity} positions is full: generate fewer tokens")
        self._pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
        self._span = self._max_length + T
        if self._max_length == 0:
            self._mask = None  # nothing stored yet: plain causal attention over the new tokens
        else:
            keys = torch.arange(self._span, device=self.lengths.device)
            self._mask = (keys[None, None, None, :] <= self._pos[:, None, :, None])  # (B, 1, T, span)
        return self._pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, D) at the rows' positions; return the keys, values and mask to attend to."""
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.capacity, D)
            self.v[layer] = v.new_zeros(B, H, self.capacity, D)
        K, V = self.k[layer], self.v[layer]
        if self._mask is None:
            T = k.size(2)
            K[:, :, :T], V[:, :, :T] = k, v
            return k, v, None
        index = self._pos[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))
        K.scatter_(2, index, k.to(K.dtype))
        V.scatter_(2, index, v.to(V.dtype))
        return K[:, :, : self._span], V[:, :, : self._span], self._mask

    # ------------------------------------------------------------ bookkeeping by the engine

    def set_lengths(self, lengths: list[int]) -> None:
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.lengths.device)
        self._host_lengths = list(lengths)

    def advance(self, n: int = 1) -> None:
        self.lengths += n
        self._host_lengths = [length + n for length in self._host_lengths]

    def repeat_rows(self, n: int) -> None:
        """Each row becomes n consecutive rows (the samples of one prompt share its prefill)."""
        self._apply(lambda t: t.repeat_interleave(n, dim=0))
        self._host_lengths = [length for length in self._host_lengths for _ in range(n)]

    def keep_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self._apply(lambda t: t.index_select(0, index))
        self._host_lengths = [self._host_lengths[r] for r in rows]

    def _apply(self, fn) -> None:
        self.k = [None if t is None else fn(t) for t in self.k]
        self.v = [None if t is None else fn(t) for t in self.v]
        self.lengths = fn(self.lengths)


@dataclass
class _Row:
    generated: int = 0
    forced: deque = field(default_factory=deque)
    in_python: bool = False
    expr: list[int] = field(default_factory=list)


class Engine:
    """Batched generation with a KV cache and the calculator tool for a `GPT` and its `Tokenizer`."""

    def __init__(self, model, tok):
        self.model = model
        self.tok = tok
        self.stop_ids = {tok.special_id("<|assistant_end|>"), tok.bos_id}
        self.python_start = tok.special_id("<|python_start|>")
        self.python_end = tok.special_id("<|python_end|>")
        self.output_start = tok.special_id("<|output_start|>")
        self.output_end = tok.special_id("<|output_end|>")

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 42, num_samples: int = 1
                 ) -> Iterator[list[tuple[int, int] | None]]:
        """Yield, once per decoding step, per row `(token, mask)` or None for a row that has finished."""
        self._check(prompts, max_tokens, temperature, num_samples)
        if not prompts or max_tokens == 0:
            return
        model, cfg, device = self.model, self.model.config, self.device
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        lengths = [len(p) for p in prompts]
        n, rows_total = num_samples, len(prompts) * num_samples

        # prefill every distinct prompt once, right-padded, then copy its cache to its samples
        width = max(lengths)
        cache = KVCache(cfg.n_layer, len(prompts), min(width + max_tokens, cfg.sequence_len), device)
        idx = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        last = torch.tensor(lengths, device=device) - 1
        logits = model.forward_cached(idx.to(device), cache, last=last)
        cache.set_lengths(lengths)
        if n > 1:
            cache.repeat_rows(n)
            logits = logits.repeat_interleave(n, dim=0)

        rows = [_Row() for _ in range(rows_total)]
        active = list(range(rows_total))  # cache row j holds batch row active[j]
        while True:
            sampled = self._sample(logits, temperature, top_k, rng).tolist()
            out: list[tuple[int, int] | None] = [None] * rows_total
            keep, feed = [], []
            for j, r in enumerate(active):
                row = rows[r]
                if row.forced:
                    token, mask = row.forced.popleft(), 0
                else:
                    token, mask = sampled[j], 1
                    self._tool(row, token)
                out[r] = (token, mask)
                row.generated += 1
                if not (token in self.stop_ids or row.generated >= max_tokens
                        or lengths[r // n] + row.generated >= cfg.sequence_len):
                    keep.append(j)
                    feed.append(token)
            yield out
            if not keep:
                return
            if len(keep) < len(active):
                cache.keep_rows(keep)
                active = [active[j] for j in keep]
            logits = model.forward_cached(torch.tensor(feed, dtype=torch.long, device=device)[:, None], cache)
            cache.advance(1)

    def generate_batch(self, prompts: list[list[int]], max_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, seed: int = 42, num_samples: int = 1
                       ) -> list[tuple[list[int], list[int]]]:
        """Per row (prompts × num_samples, in `generate`'s order): all generated tokens and their masks."""
        results = [([], []) for _ in range(len(prompts) * num_samples)]
        for step in self.generate(prompts, max_tokens, temperature, top_k, seed, num_samples):
            for r, item in enumerate(step):
                if item is not None:
                    results[r][0].append(item[0])
                    results[r][1].append(item[1])
        return results

    # ------------------------------------------------------------ internals

    def _check(self, prompts, max_tokens: int, temperature: float, num_samples: int) -> None:
        cfg = self.model.config
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise InputError(f"max_tokens must be an integer ≥ 0 (got {max_tokens!r}): pass how many tokens to generate")
        if temperature < 0:
            raise InputError(f"temperature must be ≥ 0 (got {temperature}): use 0 for greedy decoding")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise InputError(f"num_samples must be an integer ≥ 1 (got {num_samples!r}): ask for at least one sample")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty: start every prompt with <|bos|>")
            if len(p) >= cfg.sequence_len:
                raise InputError(
                    f"prompt {i} has {len(p)} tokens, which leaves no room in the model's context of {cfg.sequence_len}: "
                    f"shorten it to under {cfg.sequence_len} tokens (e.g. render_for_completion(..., max_tokens=N))"
                )
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise InputError(f"prompt {i} has token ids outside 0..{cfg.vocab_size - 1}: encode it with the model's tokenizer")

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, rng: torch.Generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=rng)[:, 0]

    def _tool(self, row: _Row, token: int) -> None:
        """Follow a row's sampled tokens through `<|python_start|> expr <|python_end|>`; queue the answer."""
        if token == self.python_start:
            row.in_python, row.expr = True, []
        elif row.in_python and token == self.python_end:
            row.in_python = False
            result = calculator.evaluate(self.tok.decode(row.expr))
            if result is not None:
                row.forced.extend([self.output_start, *self.tok.encode(result), self.output_end])
        elif row.in_python:
            row.expr.append(token)
