"""Batched sampling with a KV cache and the calculator tool: what chat, evals and RL generate with.

Batching. The rows of a batch are prompts × num_samples (prompt i's samples are rows i·n … i·n + n − 1).
Each distinct prompt is run once (prefill) and its cache is copied to its samples. Prompts of different
lengths are **right-padded** for the prefill, which is then plain causal attention: a real token only sees
earlier positions, all real, so padding never leaks in, and each row's rotary positions start at 0 exactly
as when the prompt is run alone. Row r's next-token logits are read at its own last prompt position.
After the prefill every row has its own length: a decoding step writes each row's new key/value at that
row's position (over the padding, if any) and attends over a span of the cache (a multiple of
`KVCache.SPAN_BUCKET` positions) with a per-row mask `key position ≤ query position`, so padding left in the
cache beyond a row's length is never seen.

Cache layout (`KVCache`): per layer, keys and values of shape (rows, n_kv_head, capacity, head_dim), in the
dtype the model computes k/v in (allocated on first use, so autocast works), with per-row lengths; the
buffers are allocated once, and a decoding step writes into them in place. Only the n_kv_head heads are
stored (GQA: attention broadcasts them to the query heads). When rows finish they leave the cache (the last
row moves into the freed slot), so the batch shrinks as rows end.

Batch invariance (`Engine(..., batch_invariant=True)`, the default on CPU). CPU matrix products give a row
different last bits depending on how many rows share the product (a 1-row product takes another kernel than
an 8-row one). In this mode a decoding step computes every row with the same shapes whatever the batch: the
linear layers as one matrix-vector product per row (a batched product over rows), attention over a span set
by the row's own length (rows of equal span share one product), in a cache of `sequence_len` positions.
A row's tokens then never depend on its batch mates, so the continuous batcher (`model.chat.batching`)
gives a request exactly the tokens `generate([prompt], ...)` gives it alone (checked bitwise in the tests;
it rests on each batched product giving every item the numbers it gives that item alone, which holds for
this PyTorch's CPU kernels). Off (the default on CUDA, where cuBLAS gives no such promise anyway): ordinary
matrix products, one span for the batch and a cache of min(longest prompt + max_tokens, sequence_len).

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
`seed`: the same call gives the same tokens, and rows are drawn independently. A draw is made at every
step, forced or not, so the generator's stream does not depend on tool use.
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
    """Keys/values of every layer for a batch of rows, each row with its own length (see the module doc).

    Rows 0 … batch − 1 are in use; buffers may hold more rows (room to grow without reallocating)."""

    def __init__(self, n_layer: int, batch: int, capacity: int, device: torch.device | str,
                 batch_invariant: bool = False):
        device = torch.device(device)
        self.capacity = capacity
        self.batch_invariant = batch_invariant
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self._rows = batch  # rows allocated
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # tokens stored per row
        self._host_lengths = [0] * batch  # the same on the host, so that no step waits on the device for them
        self._keys = torch.arange(capacity, device=device)
        self._hidden_buf = torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device)
        self._pos: torch.Tensor | None = None
        self._index: torch.Tensor | None = None  # where a step's keys/values go in the cache
        self._hidden: torch.Tensor | None = None  # (B, 1, T, capacity): True where a query may not look
        self._groups: list[tuple[int, torch.Tensor | None]] = []  # a decoding step's (span, rows or None: all)

    @property
    def batch(self) -> int:
        return len(self._host_lengths)

    # ------------------------------------------------------------ the interface GPT.forward_cached uses

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the T tokens about to be run (and the attention mask that goes with them)."""
        longest = max(self._host_lengths, default=0)
        if longest + T > self.capacity:
            raise InputError(f"KV cache of {self.capacity} positions is full: generate fewer tokens")
        lengths = self.lengths[: self.batch]
        self._index = None
        if T == 1:
            self._pos = lengths[:, None]
        else:
            self._pos = lengths[:, None] + torch.arange(T, device=lengths.device)
        if longest == 0:
            self._hidden = None  # nothing stored yet: plain causal attention over the new tokens
        elif T == 1:  # the decoding step: written in place, no allocation that grows with the context
            self._hidden = torch.gt(self._keys, self._pos[:, None, :, None], out=self._hidden_buf[: self.batch])
            self._groups = self._span_groups()
        else:
            self._hidden = self._keys > self._pos[:, None, :, None]
        return self._pos

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (B, H_kv, T, D) at the rows' positions; attention output (B, H, T, D) of the queries q."""
        B, H, T, D = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self._rows, H, self.capacity, D)
            self.v[layer] = v.new_zeros(self._rows, H, self.capacity, D)
        K, V = self.k[layer][:B], self.v[layer][:B]
        gqa = q.size(1) != H
        if self._hidden is None:
            K[:, :, :T], V[:, :, :T] = k, v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if self._index is None:  # the same for every layer: made once per step
            self._index = self._pos[:, None, :, None].expand(-1, H, -1, D)
        K.scatter_(2, self._index, k if k.dtype == K.dtype else k.to(K.dtype))
        V.scatter_(2, self._index, v if v.dtype == V.dtype else v.to(V.dtype))
        if T == 1:
            return self._attend_groups(q, K, V)
        return F.scaled_dot_product_attention(q, K, V, attn_mask=~self._hidden, enable_gqa=gqa)

    # A decoding step attends over a span of the cache, a multiple of SPAN_BUCKET positions, not the whole
    # capacity. Batch invariant: each row's span follows from its own length alone, and rows of one span go
    # through one product (the same shapes whatever the batch). Otherwise: one span, the longest row's.
    SPAN_BUCKET = 64

    def _span_groups(self) -> list[tuple[int, torch.Tensor | None]]:
        def span(length: int) -> int:
            return min(self.capacity, -(-(length + 1) // self.SPAN_BUCKET) * self.SPAN_BUCKET)

        spans = [span(n) for n in self._host_lengths]
        if not self.batch_invariant or len(set(spans)) == 1:
            return [(max(spans), None)]
        rows: dict[int, list[int]] = {}
        for r, s in enumerate(spans):
            rows.setdefault(s, []).append(r)
        return [(s, torch.tensor(rs, device=self.lengths.device)) for s, rs in rows.items()]

    def _attend_groups(self, q: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        if len(self._groups) == 1:
            s = self._groups[0][0]
            return _attend_one(q, K[:, :, :s], V[:, :, :s], self._hidden[..., :s])
        out = torch.empty_like(q)
        for s, rows in self._groups:
            out[rows] = _attend_one(q[rows], K[rows, :, :s], V[rows, :, :s], self._hidden[rows, ..., :s])
        return out

    # ------------------------------------------------------------ bookkeeping by the engine

    def set_lengths(self, lengths: list[int]) -> None:
        self.lengths[: len(lengths)] = torch.tensor(lengths, dtype=torch.long)
        self._host_lengths = list(lengths)

    def advance(self, n: int = 1) -> None:
        self.lengths[: self.batch] += n
        self._host_lengths = [length + n for length in self._host_lengths]

    def repeat_rows(self, n: int) -> None:
        """Each row becomes n consecutive rows (the samples of one prompt share its prefill)."""
        B = self.batch
        self._map(lambda t: t[:B].repeat_interleave(n, dim=0))
        self._host_lengths = [length for length in self._host_lengths for _ in range(n)]
        self._rows = B * n
        self._hidden_buf = self._hidden_buf.new_zeros((B * n,) + self._hidden_buf.shape[1:])

    def remove_rows(self, rows: list[int]) -> list[int]:
        """Free these rows: the last rows move into the gaps. Returns `order`: row j now holds old row order[j]."""
        order = list(range(self.batch))
        for r in sorted(set(rows), reverse=True):
            last = len(order) - 1
            if r != last:  # physical row `last` holds old row order[last]
                self._copy_row(r, self, last, self._host_lengths[order[last]])
                order[r] = order[last]
            order.pop()
        self._host_lengths = [self._host_lengths[j] for j in order]
        return order

    def append_row(self, other: "KVCache", row: int = 0) -> None:
        """Add `other`'s row (a prefill) as this cache's last row; buffers grow by doubling when full."""
        B = self.batch
        if B == self._rows:
            grow = max(1, B)
            self._map(lambda t: torch.cat([t, t.new_zeros((grow,) + t.shape[1:])]))
            self._hidden_buf = self._hidden_buf.new_zeros((B + grow,) + self._hidden_buf.shape[1:])
            self._rows += grow
        for i, t in enumerate(other.k):
            if self.k[i] is None and t is not None:
                self.k[i] = t.new_zeros(self._rows, t.size(1), self.capacity, t.size(3))
                self.v[i] = self.k[i].clone()
        self._host_lengths.append(other._host_lengths[row])
        self._copy_row(B, other, row, other._host_lengths[row])

    def _copy_row(self, dst: int, src: "KVCache", row: int, n: int) -> None:
        for K, V, k, v in zip(self.k, self.v, src.k, src.v):
            if K is not None:
                K[dst, :, :n], V[dst, :, :n] = k[row, :, :n], v[row, :, :n]
        self.lengths[dst] = src.lengths[row]

    def _map(self, fn) -> None:
        self.k = [None if t is None else fn(t) for t in self.k]
        self.v = [None if t is None else fn(t) for t in self.v]
        self.lengths = fn(self.lengths)


def _attend_one(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """One query per row over the whole cache: every row has the same shapes whatever the batch (see the doc)."""
    B, H, _, D = q.shape
    Hkv = K.size(1)
    q = q.reshape(B, Hkv, H // Hkv, D) * D ** -0.5  # the query heads of one kv head side by side
    scores = torch.matmul(q, K.transpose(2, 3))
    if scores.dtype != torch.float32:  # (a no-op call costs as much as the arithmetic at batch 1)
        scores = scores.float()
    weights = scores.masked_fill_(hidden, float("-inf")).softmax(-1)
    if weights.dtype != V.dtype:
        weights = weights.to(V.dtype)
    return torch.matmul(weights, V).reshape(B, H, 1, D)


@dataclass
class _Row:
    generated: int = 0
    forced: deque = field(default_factory=deque)
    in_python: bool = False
    expr: list[int] = field(default_factory=list)


class Engine:
    """Batched generation with a KV cache and the calculator tool for a `GPT` and its `Tokenizer`."""

    def __init__(self, model, tok, batch_invariant: bool | None = None):
        self.model = model
        self.tok = tok
        self.stop_ids = {tok.special_id("<|assistant_end|>"), tok.bos_id}
        self.python_start = tok.special_id("<|python_start|>")
        self.python_end = tok.special_id("<|python_end|>")
        self.output_start = tok.special_id("<|output_start|>")
        self.output_end = tok.special_id("<|output_end|>")
        self.batch_invariant = self.device.type == "cpu" if batch_invariant is None else batch_invariant

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
        model, device = self.model, self.device
        rng = self.generator(seed)
        lengths = [len(p) for p in prompts]
        n, rows_total = num_samples, len(prompts) * num_samples
        cache, logits = self.prefill(prompts, max_tokens)
        if n > 1:
            cache.repeat_rows(n)
            logits = logits.repeat_interleave(n, dim=0)

        rows = [_Row() for _ in range(rows_total)]
        active = list(range(rows_total))  # cache row j holds batch row active[j]
        while True:
            sampled = self._sample(logits, temperature, top_k, rng).tolist()
            out: list[tuple[int, int] | None] = [None] * rows_total
            done, feed = [], []
            for j, r in enumerate(active):
                token, mask, finished = self.next_token(rows[r], sampled[j], lengths[r // n], max_tokens)
                out[r] = (token, mask)
                feed.append(token)
                if finished:
                    done.append(j)
            yield out
            if len(done) == len(active):
                return
            if done:
                order = cache.remove_rows(done)
                active, feed = [active[j] for j in order], [feed[j] for j in order]
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

    # ------------------------------------------------------------ the steps, shared with the batcher

    def new_cache(self, rows: int, capacity: int) -> KVCache:
        return KVCache(self.model.config.n_layer, rows, capacity, self.device, self.batch_invariant)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], max_tokens: int) -> tuple[KVCache, torch.Tensor]:
        """Run the prompts (right-padded) into a new cache: the cache and each prompt's next-token logits."""
        seq, width = self.model.config.sequence_len, max(map(len, prompts))
        cache = self.new_cache(len(prompts), seq if self.batch_invariant else min(width + max_tokens, seq))
        idx = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        logits = self.model.forward_cached(idx.to(self.device), cache, last=last)
        cache.set_lengths([len(p) for p in prompts])
        return cache, logits

    def generator(self, seed: int) -> torch.Generator:
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed)
        return rng

    def next_token(self, row: _Row, sampled: int, prompt_len: int, max_tokens: int) -> tuple[int, int, bool]:
        """The row's token this step (forced or `sampled`), its mask, and whether the row ends with it."""
        if row.forced:
            token, mask = row.forced.popleft(), 0
        else:
            token, mask = sampled, 1
            self._tool(row, token)
        row.generated += 1
        finished = (token in self.stop_ids or row.generated >= max_tokens
                    or prompt_len + row.generated >= self.model.config.sequence_len)
        return token, mask, finished

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
