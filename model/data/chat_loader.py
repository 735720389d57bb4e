"""Loaders over a `conversations` artifact for the fine-tuning stages: a packed token stream (mid) and padded
one-conversation rows (sft). Both are exactly resumable from a small JSON state.

The artifact
    `train.parquet` and `val.parquet`, columns `messages` (JSON text of a conversation in
    model/chat/conversation.py's schema), `source` (str) and `answer` (str or null). `Conversations` reads a
    split's `messages` and `source` columns and parses a conversation only when it is rendered, so a process
    holds the JSON text and the tokens of its own streams, not every parsed conversation.

Data streams (as base pretraining)
    A step's global batch is split into S fixed streams; a process of W takes streams r, r+W, … and
    accumulates their gradients. What a stream yields depends only on S (never on W), so N processes compute
    the steps one process computes, and a resume may change the process count.

Packed (mid: `PackedStream`)
    Stream s of S reads conversations s, s+S, s+2S, … of the split (in the artifact's order, which the mixture
    stage shuffled), renders each with `render` (`[BOS] …`, never truncated: packing spans rows) and
    concatenates them, epoch after epoch, into one endless token stream. A micro-batch is B consecutive rows
    of T+1 tokens of it (B·(T+1) tokens consumed; a row's inputs are its first T tokens, its targets its last
    T). Every token is a target of the row holding it except a row's first. Loss on every target by default
    (nanochat v0 renders and ignores the mask); `mask_loss=True` sets a target to -1 where the render mask
    is 0 (user turns, tool output, BOS). State: `{"epoch", "pos"}` (the stream offset of the next row) plus
    what it is only valid for (stream, streams, rows, seq_len, conversations, the stream's token count).

Padded (sft: `PaddedBatches`)
    Epoch e's order is a permutation of the split (numpy `default_rng([seed, e])`); it is cut into global
    batches of E = S·B consecutive conversations (the last N mod E of each epoch's order are left out, so
    every step lies inside one epoch, and an epoch is N // E steps, nanochat's count); stream s takes
    positions s·B … s·B+B-1 of each global batch. A conversation is rendered and cut to `max_tokens`
    (= the model's sequence_len + 1) tokens; inputs are its tokens but the last, targets its tokens but the
    first, -1 where the render mask is 0; rows are padded to the batch's longest (inputs with
    `<|assistant_end|>`, targets with -1), as nanochat's SFT collate. State: `{"epoch", "batch"}` plus
    stream, streams, batch_size, conversations, seed.

Rendering
    `Conversations.render_many` encodes the message texts of up to 1,024 conversations in one `encode_batch`
    (HF tokenizers spreads it over all cores) and gives them to `render`, so tokens are exactly `render`'s.
    A mid process renders the conversations of its own streams once, at start (the step count needs the
    split's token total, summed over processes). A conversation whose JSON exceeds MAX_CONVERSATION_CHARS
    is a one-line InputError naming it, as is one `render` refuses. (nanochat v0 also cut every mid-training
    conversation at 2,048 tokens, its render default; packing needs no cut, so none is made here.)

Validation
    `packed_eval_batches` and `padded_eval_batches` give a fixed pass over the start of the val split, the
    same on every call, split across ranks so that the sums over ranks do not depend on W.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from model.chat.conversation import render
from model.errors import InputError

STATE_VERSION = 1
# A conversation whose JSON is longer than this is not a chat turn but a mistake (a whole book, a dump):
# it is refused before tokenization rather than exhausting memory or time.
MAX_CONVERSATION_CHARS = 1_000_000
_RENDER_CHUNK = 1024  # conversations encoded together
_FRESH = "delete the stage's work-in-progress directory to start over"


class Conversations:
    """One split of a conversations artifact: `len()`, `source(i)`, `messages(i)`, `render(i, tok)`."""

    def __init__(self, data_dir: Path, split: str):
        import pyarrow.parquet as pq

        self.data_dir, self.split = Path(data_dir), split
        path = self.data_dir / f"{split}.parquet"
        if not path.is_file():
            raise InputError(f"{self.data_dir} has no {split}.parquet: pass a conversations artifact "
                             "(the mid_data / sft_data stage's output)")
        try:
            table = pq.read_table(path, columns=["messages", "source"])
        except Exception as e:  # pyarrow raises several types for a truncated / foreign file
            raise InputError(f"cannot read {path} as a conversations table ({type(e).__name__}: {e}): "
                             "rebuild the conversations artifact".replace("\n", " ")) from None
        self._messages = table.column("messages").combine_chunks()
        self._sources = table.column("source").combine_chunks()

    def __len__(self) -> int:
        return len(self._messages)

    def source(self, i: int) -> str:
        return self._sources[i].as_py()

    def messages(self, i: int) -> list:
        raw = self._messages[i].as_py()
        where = f"{self.split} conversation {i} ({self.source(i)})"
        if not isinstance(raw, str):
            raise InputError(f"{where} has no messages: rebuild the conversations artifact")
        if len(raw) > MAX_CONVERSATION_CHARS:
            raise InputError(f"{where} is {len(raw):,} characters long, more than the {MAX_CONVERSATION_CHARS:,} a "
                             "conversation may have: drop it from the mixture")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise InputError(f"{where}: messages is not valid JSON ({e}): rebuild the conversations artifact") from None

    def render(self, i: int, tok, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """`render` of conversation i, its errors naming the conversation."""
        return self.render_many([i], tok, max_tokens)[0]

    def render_many(self, indices, tok, max_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
        """`render` of each conversation in `indices`. The message texts are encoded together first
        (`encode_batch`, which HF tokenizers spreads over all cores); `render` then reads them from that cache,
        so the tokens are exactly `render`'s."""
        parsed = [self.messages(i) for i in indices]
        texts = list(dict.fromkeys(t for messages in parsed for t in _texts(messages)))
        cached = _CachedEncoder(tok, dict(zip(texts, tok.encode_batch(texts)))) if texts else tok
        out = []
        for i, messages in zip(indices, parsed):
            try:
                out.append(render(messages, cached, max_tokens=max_tokens))
            except InputError as e:
                raise InputError(f"{self.split} conversation {i} ({self.source(i)}): {e}") from None
        return out


def _texts(messages) -> list[str]:
    """The strings `render` will encode (best effort: a text it encodes that is not here is encoded alone)."""
    out = []
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


class _CachedEncoder:
    """The tokenizer, with `encode` answered from texts encoded beforehand."""

    def __init__(self, tok, cache: dict[str, list[int]]):
        self._tok, self._cache = tok, cache

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        return list(ids) if ids is not None else self._tok.encode(text)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _require_split(convs: Conversations, what: str) -> None:
    if len(convs) == 0:
        raise InputError(f"the {convs.split} split of {convs.data_dir} has no conversations, but {what} needs some: "
                         "rebuild the conversations artifact with train entries")


def _check(state: dict, expected: dict, what: str) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise InputError(f"cannot resume the {what} loader: unknown state format: {_FRESH}")
    for k, v in expected.items():
        if state.get(k) != v:
            raise InputError(f"cannot resume the {what} loader: its saved state has {k}={state.get(k)} but this run has "
                             f"{k}={v} (the data, tokenizer or batch changed): {_FRESH}")


# ---------------------------------------------------------------- packed (mid)

class PackedStream:
    """Stream `stream` of `streams`: micro-batches (x, y) of shape (batch_size, seq_len); see the module docstring."""

    def __init__(self, convs: Conversations, tok, stream: int, streams: int, batch_size: int, seq_len: int,
                 mask_loss: bool = False, state: dict | None = None, device: str | torch.device = "cpu"):
        if not 0 <= stream < streams or batch_size < 1 or seq_len < 1:
            raise ValueError(f"need 0 <= stream < streams and positive sizes, not {stream}, {streams}, {batch_size}, {seq_len}")
        _require_split(convs, "training")
        if len(convs) < streams:
            raise InputError(
                f"the {convs.split} split has {len(convs)} conversation(s) but training reads {streams} data streams "
                "(total_batch_size / (device_batch_size × sequence_len)), one conversation each at least: use more "
                "conversations or a smaller total_batch_size")
        self.stream, self.streams, self.batch_size, self.seq_len = stream, streams, batch_size, seq_len
        self.mask_loss, self.device = mask_loss, torch.device(device)
        ids, masks = [], []
        mine = range(stream, len(convs), streams)
        for k in range(0, len(mine), _RENDER_CHUNK):
            for a, m in convs.render_many(mine[k:k + _RENDER_CHUNK], tok):
                ids.append(np.asarray(a, dtype=np.int32))
                if mask_loss:
                    masks.append(np.asarray(m, dtype=np.bool_))
        self.conversations = len(convs)
        self.tokens = np.concatenate(ids)
        self.mask = np.concatenate(masks) if mask_loss else None
        self.epoch, self.pos = 0, 0
        if state is not None:
            _check(state, self._identity(), f"stream {stream}")
            self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
            if not 0 <= self.pos < len(self.tokens) or self.epoch < 0:
                raise InputError(f"cannot resume data stream {stream}: position {self.pos} is outside its "
                                 f"{len(self.tokens)} tokens: {_FRESH}")

    def _identity(self) -> dict:
        return {"stream": self.stream, "streams": self.streams, "rows": self.batch_size, "seq_len": self.seq_len,
                "conversations": self.conversations, "tokens": int(len(self.tokens)), "mask_loss": self.mask_loss}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "epoch": self.epoch, "pos": self.pos}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, n = self.batch_size, self.seq_len, len(self.tokens)
        take = (self.pos + np.arange(B * (T + 1))) % n  # wraps into the next epoch (several times for a short stream)
        end = self.pos + B * (T + 1)
        self.epoch, self.pos = self.epoch + end // n, end % n
        rows = self.tokens[take].astype(np.int64).reshape(B, T + 1)
        x, y = rows[:, :-1], rows[:, 1:].copy()
        if self.mask is not None:
            y[~self.mask[take].reshape(B, T + 1)[:, 1:]] = -1
        return (torch.from_numpy(np.ascontiguousarray(x)).to(self.device),
                torch.from_numpy(y).to(self.device))


def packed_eval_batches(convs: Conversations, tok, batch_size: int, seq_len: int, max_tokens: int, rank: int = 0,
                        world_size: int = 1, mask_loss: bool = False,
                        device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split packed into one stream (all conversations in order, wrapping when short): K = max(1,
    max_tokens // (B·T)) full batches per rank (callers pass eval_tokens // world_size), rank r taking rows
    r, r+W, … of the global rows. Nothing when the split is empty. Renders only the conversations it needs."""
    if len(convs) == 0:
        return
    steps = max(1, max_tokens // (batch_size * seq_len))
    rows = steps * batch_size * world_size
    need = rows * (seq_len + 1)
    ids, masks, have, k = [], [], 0, 0
    while have < need and k < len(convs):
        for a, m in convs.render_many(range(k, min(k + _RENDER_CHUNK, len(convs))), tok):
            ids.append(np.asarray(a, dtype=np.int64))
            masks.append(np.asarray(m, dtype=np.bool_))
            have += len(a)
        k += _RENDER_CHUNK
    tokens, mask = np.concatenate(ids), np.concatenate(masks)
    mine = np.arange(rank, rows, world_size)
    for k in range(steps):
        r = mine[k * batch_size:(k + 1) * batch_size]
        take = (r[:, None] * (seq_len + 1) + np.arange(seq_len + 1)[None, :]) % len(tokens)
        block = tokens[take]
        x, y = block[:, :-1], block[:, 1:].copy()
        if mask_loss:
            y[~mask[take][:, 1:]] = -1
        yield torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device)


# ---------------------------------------------------------------- padded (sft)

def collate(rendered: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows padded to the longest: inputs = ids[:-1] (pad `pad_id`), targets = ids[1:] with -1 where mask[1:] is 0
    and on padding. Also the count of non-pad input tokens."""
    cols = max(len(ids) for ids, _ in rendered) - 1
    x = np.full((len(rendered), cols), pad_id, dtype=np.int64)
    y = np.full((len(rendered), cols), -1, dtype=np.int64)
    count = 0
    for i, (ids, mask) in enumerate(rendered):
        a, m = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.bool_)
        n = len(a) - 1
        x[i, :n] = a[:-1]
        y[i, :n] = np.where(m[1:], a[1:], -1)
        count += n
    return torch.from_numpy(x), torch.from_numpy(y), count


class PaddedBatches:
    """Stream `stream` of `streams`: micro-batches (x, y, input_tokens) of `batch_size` conversations; see the
    module docstring."""

    def __init__(self, convs: Conversations, tok, stream: int, streams: int, batch_size: int, max_tokens: int,
                 seed: int, state: dict | None = None, device: str | torch.device = "cpu"):
        if not 0 <= stream < streams or batch_size < 1 or max_tokens < 2:
            raise ValueError(f"need 0 <= stream < streams, batch_size >= 1, max_tokens >= 2, not {stream}, {streams}, {batch_size}, {max_tokens}")
        _require_split(convs, "training")
        per_step = streams * batch_size
        if len(convs) < per_step:
            raise InputError(f"the {convs.split} split has {len(convs)} conversation(s), fewer than the {per_step} "
                             "of one step (examples_per_step): lower sft.examples_per_step or use more conversations")
        self.convs, self.tok = convs, tok
        self.stream, self.streams, self.batch_size, self.max_tokens, self.seed = stream, streams, batch_size, max_tokens, seed
        self.per_epoch = len(convs) // per_step
        self.pad_id = tok.special_id("<|assistant_end|>")
        self.device = torch.device(device)
        self.epoch, self.batch = 0, 0
        if state is not None:
            _check(state, self._identity(), f"stream {stream}")
            self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
            if not 0 <= self.batch < self.per_epoch or self.epoch < 0:
                raise InputError(f"cannot resume data stream {stream}: batch {self.batch} is outside the epoch's "
                                 f"{self.per_epoch}: {_FRESH}")
        self._order_epoch, self._order = None, None

    def _identity(self) -> dict:
        return {"stream": self.stream, "streams": self.streams, "batch_size": self.batch_size,
                "max_tokens": self.max_tokens, "conversations": len(self.convs), "seed": self.seed}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "epoch": self.epoch, "batch": self.batch}

    def order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation of the split."""
        if self._order_epoch != epoch:
            self._order_epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.convs))
        return self._order

    def indices(self) -> list[int]:
        """The conversations of the next micro-batch."""
        start = self.batch * self.streams * self.batch_size + self.stream * self.batch_size
        return [int(i) for i in self.order(self.epoch)[start:start + self.batch_size]]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        rendered = self.convs.render_many(self.indices(), self.tok, max_tokens=self.max_tokens)
        self.batch += 1
        if self.batch == self.per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        x, y, count = collate(rendered, self.pad_id)
        return x.to(self.device), y.to(self.device), count


def padded_eval_batches(convs: Conversations, tok, batch_size: int, max_tokens: int, examples: int, rank: int = 0,
                        world_size: int = 1, device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `examples` val conversations (file order), rank r taking r, r+W, …, `batch_size` per batch."""
    mine = list(range(rank, min(examples, len(convs)), world_size))
    pad_id = tok.special_id("<|assistant_end|>")
    for k in range(0, len(mine), batch_size):
        x, y, _ = collate(convs.render_many(mine[k:k + batch_size], tok, max_tokens=max_tokens), pad_id)
        yield x.to(device), y.to(device)
