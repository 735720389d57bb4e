"""Pretraining data loader: an endless, exactly resumable stream of (x, y) token batches from a dataset split.

The stream
    Every document becomes `[BOS] + encode(text)`; the documents of a row group are tokenized together
    (`tokenizer.encode_batch`) and concatenated; the row groups of this rank follow one another, epoch after
    epoch, as one token stream. A batch is a window of B·T+1 tokens: x = the first B·T, y = the last B·T
    (y is x shifted by one), seen as (B, T) int64 tensors. Consecutive windows advance by B·T, so each batch
    shares one boundary token with the next (its y's last token is the next x's first token) and every token
    of the stream is a target exactly once. Documents are packed: a row may start mid-document and span
    several documents, as in nanochat's pretraining loader.

Ranks
    The row groups of all shards of the split, in shard order then row-group order, form one global list;
    rank r of W takes row groups r, r+W, r+2W, … of it. Together the W processes read each row group exactly
    once per epoch. A rank left without a row group (fewer row groups than processes) is an InputError.

Resume
    `state_dict()` is the position just after the last batch returned: `epoch`, `row_group` (the index in this
    rank's own sequence of row groups) and `offset` (where the unconsumed tokens start inside that row group's
    token stream), plus what the position is only valid for: split, rank, world_size, batch_size, seq_len,
    the tokenizer's vocab_size and a fingerprint of the split's shard list (file names and sizes).
    `TokenLoader(..., state=saved)` re-tokenizes that one row group, skips `offset` tokens and goes on, so
    the batches are exactly those an uninterrupted loader would have returned — across row-group, shard and
    epoch boundaries. The state holds no tokens; it is a small JSON-serialisable dict such as
        {"version": 1, "split": "train", "epoch": 0, "row_group": 3, "offset": 517, "rank": 0,
         "world_size": 2, "batch_size": 32, "seq_len": 2048, "vocab_size": 65536, "shards": "9f2c…"}

Threads
    HF `tokenizers` already parallelises `encode_batch` over its one process-wide rayon pool (sized by
    RAYON_NUM_THREADS when first used; this module does not resize it). `threads` is something else: the
    number of row groups read and tokenized *ahead* of the consumer, each on its own thread of a small
    pool, so that tokenization overlaps the training step (the Rust side releases the GIL). `threads=0`
    tokenizes synchronously in the caller's thread when the buffer runs low. The batches do not depend on it.
    Memory: at most `threads` row groups of tokens in flight plus the one or two being consumed.
    `threads=None` sizes it to the cores this process has (`default_threads`): read-ahead beyond what the
    cores can tokenize while training runs only takes CPU from the training step (at start-up above all).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from model.data.dataset import list_shards
from model.errors import InputError

STATE_VERSION = 1
_FRESH = "start a fresh run"


def process_cores() -> int:
    """CPU cores this process may use: its affinity mask shared among the processes of this node (torchrun's
    LOCAL_WORLD_SIZE), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def default_threads(loaders: int = 1) -> int:
    """Read-ahead threads per loader when `loaders` loaders share this process: its cores split among them,
    1 to 4 each (a row group ahead is enough for a loader to never wait; more only competes with training)."""
    return max(1, min(4, process_cores() // max(1, loaders)))


def _shard_fingerprint(shards: list[Path]) -> str:
    """sha256 of the shard names and sizes, 16 hex digits: a different artifact (or a rewritten one) differs."""
    listing = [[p.name, p.stat().st_size] for p in shards]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()[:16]


def _split_row_groups(dataset_dir: Path, split: str) -> tuple[list[tuple[Path, int]], str]:
    """The split's global row-group list [(shard, index in shard)] and the shard-list fingerprint."""
    shards = list_shards(dataset_dir, split)
    if not shards:
        raise InputError(f"no {split} shards ({split}_*.parquet) in {dataset_dir}: run the data stage first "
                         "(or point at its output directory)")
    row_groups = []
    for path in shards:
        try:
            count = pq.ParquetFile(path).metadata.num_row_groups
        except Exception as e:  # pyarrow raises several types for a truncated / non-parquet file
            raise InputError(f"cannot read parquet shard {path}: {e.__class__.__name__}: {e}: "
                             "rebuild the dataset with the data stage".replace("\n", " ")) from None
        row_groups.extend((path, i) for i in range(count))
    return row_groups, _shard_fingerprint(shards)


def _tokenize_row_group(path: Path, index: int, tokenizer, bos: int) -> np.ndarray:
    """One row group as a token stream: [BOS] + ids for each document, concatenated (int32)."""
    texts = pq.ParquetFile(path).read_row_group(index, columns=["text"]).column(0).to_pylist()
    flat: list[int] = []
    for ids in tokenizer.encode_batch([t if t is not None else "" for t in texts]):
        flat.append(bos)
        flat.extend(ids)
    return np.array(flat, dtype=np.int32)


class TokenLoader:
    """Iterator of (x, y) int64 tensors of shape (batch_size, seq_len) on `device`; see the module docstring.

    `loop=True` (training): endless, epoch after epoch. `loop=False` (a single pass): StopIteration when the
    rest of the split holds fewer than batch_size·seq_len + 1 tokens (that tail is not returned).
    Call `close()` (or use it as a context manager) to stop the prefetch threads early.
    """

    def __init__(self, dataset_dir: Path, split: str, tokenizer, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, state: dict | None = None, threads: int | None = None,
                 device: str = "cpu", loop: bool = True):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, not {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, not rank={rank} world_size={world_size}")
        if threads is None:
            threads = default_threads()
        if threads < 0:
            raise ValueError(f"threads must be >= 0, not {threads}")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size, self.seq_len = batch_size, seq_len
        self.loop = loop
        self._tokenizer = tokenizer
        self._bos = int(tokenizer.bos_id)
        self._vocab_size = getattr(tokenizer, "vocab_size", None)
        self._device = torch.device(device)

        everything, self._fingerprint = _split_row_groups(Path(dataset_dir), split)
        self._mine = everything[rank::world_size]
        if not self._mine:
            raise InputError(
                f"the {split} split of {dataset_dir} has {len(everything)} row group(s), fewer than the "
                f"{world_size} processes: rank {rank} would read nothing; run with at most {len(everything)} "
                "processes, or rebuild the dataset with more documents or a smaller data.row_group_size"
            )

        epoch, row_group, offset = self._check_state(state) if state is not None else (0, 0, 0)
        self._start = (epoch, row_group, offset)
        # Buffered row groups, oldest first: [epoch, row_group, tokens, start]; `start` is where the
        # unconsumed tokens begin (only the first entry can have consumed tokens).
        self._chunks: deque[list] = deque()
        self._buffered = 0  # unconsumed tokens in _chunks
        self._skip = offset  # tokens to drop from the first row group fetched (a resumed position)
        self._next: tuple[int, int] | None = (epoch, row_group)  # next row group to submit
        self._pending: deque[tuple[int, int, Future | Callable[[], np.ndarray]]] = deque()
        self._empty_run = 0  # consecutive row groups without tokens (guards an endless loop)
        self._done = False
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="token-loader") if threads > 0 else None
        self._submit()  # start tokenizing now: it overlaps model setup

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Position just after the last batch returned (JSON-serialisable; see the module docstring)."""
        if self._chunks:
            epoch, row_group, _, start = self._chunks[0]
        else:  # nothing fetched yet: still where we started
            epoch, row_group, start = self._start
        return {
            "version": STATE_VERSION, "split": self.split,
            "epoch": int(epoch), "row_group": int(row_group), "offset": int(start),
            "rank": self.rank, "world_size": self.world_size,
            "batch_size": self.batch_size, "seq_len": self.seq_len,
            "vocab_size": self._vocab_size, "shards": self._fingerprint,
        }

    @property
    def epoch(self) -> int:
        """Epoch of the next unconsumed token (0 for the first pass)."""
        return self.state_dict()["epoch"]

    def _check_state(self, state: dict) -> tuple[int, int, int]:
        def mismatch(what: str, saved: Any, now: Any, fix: str) -> InputError:
            return InputError(f"cannot resume the {self.split} data loader: its saved state has {what}={saved} "
                              f"but this run has {what}={now}: {fix} or {_FRESH}")

        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise InputError(f"cannot resume the data loader: unknown state format (version {version!r}, "
                             f"expected {STATE_VERSION}): {_FRESH}")
        missing = [k for k in ("split", "epoch", "row_group", "offset", "rank", "world_size", "batch_size",
                               "seq_len", "shards") if k not in state]
        if missing:
            raise InputError(f"cannot resume the data loader: its saved state lacks {', '.join(missing)}: {_FRESH}")
        if state["split"] != self.split:
            raise mismatch("split", state["split"], self.split, "resume from a state of the same split")
        if state["shards"] != self._fingerprint:
            raise mismatch("shards", state["shards"], self._fingerprint,
                           "the dataset's shard files differ (names or sizes); resume with the same dataset")
        if state["world_size"] != self.world_size:
            raise mismatch("world_size", state["world_size"], self.world_size, "resume with the same nproc")
        if state["rank"] != self.rank:
            raise mismatch("rank", state["rank"], self.rank, "give each process the state saved by its own rank")
        if (state["batch_size"], state["seq_len"]) != (self.batch_size, self.seq_len):
            raise mismatch("batch_size x seq_len", f"{state['batch_size']}x{state['seq_len']}",
                           f"{self.batch_size}x{self.seq_len}",
                           "resume with the same device_batch_size and max_seq_len")
        saved_vocab = state.get("vocab_size")
        if saved_vocab is not None and self._vocab_size is not None and saved_vocab != self._vocab_size:
            raise mismatch("vocab_size", saved_vocab, self._vocab_size, "resume with the same tokenizer")
        epoch, row_group, offset = state["epoch"], state["row_group"], state["offset"]
        ok = all(isinstance(v, int) and v >= 0 for v in (epoch, row_group, offset))
        if not ok or row_group >= len(self._mine) or (epoch > 0 and not self.loop):
            raise InputError(f"cannot resume the {self.split} data loader: position epoch={epoch} "
                             f"row_group={row_group} offset={offset} is outside this rank's "
                             f"{len(self._mine)} row group(s): {_FRESH}")
        return epoch, row_group, offset

    # ------------------------------------------------------------------ fetching

    def _submit(self) -> None:
        """Keep up to max(threads, 1) row groups in flight, in order."""
        while self._next is not None and len(self._pending) < max(self._threads, 1):
            epoch, k = self._next
            path, index = self._mine[k]
            if self._pool is not None:
                job = self._pool.submit(_tokenize_row_group, path, index, self._tokenizer, self._bos)
            else:
                job = lambda path=path, index=index: _tokenize_row_group(path, index, self._tokenizer, self._bos)
            self._pending.append((epoch, k, job))
            if k + 1 < len(self._mine):
                self._next = (epoch, k + 1)
            else:
                self._next = (epoch + 1, 0) if self.loop else None

    def _fetch(self) -> bool:
        """Append the next row group's tokens to the buffer; False at the end of a single pass."""
        self._submit()
        if not self._pending:
            return False
        epoch, k, job = self._pending.popleft()
        tokens = job.result() if isinstance(job, Future) else job()
        self._submit()
        start, self._skip = self._skip, 0
        if start > len(tokens):
            raise InputError(
                f"cannot resume the {self.split} data loader: the saved offset {start} lies beyond the "
                f"{len(tokens)} tokens of row group {k} (the dataset or tokenizer changed): {_FRESH}"
            )
        self._empty_run = self._empty_run + 1 if len(tokens) == start else 0
        if self._empty_run > len(self._mine):
            raise InputError(f"the {self.split} split yields no tokens for rank {self.rank}: "
                             "rebuild the dataset with the data stage")
        self._chunks.append([epoch, k, tokens, start])
        self._buffered += len(tokens) - start
        self._drop_empty_front()
        return True

    def _drop_empty_front(self) -> None:
        while self._chunks and self._chunks[0][3] >= len(self._chunks[0][2]):
            self._chunks.popleft()

    # ------------------------------------------------------------------ batches

    def _window(self, materialize: bool = True) -> np.ndarray | None:
        """The next B·T+1 tokens (int64) and advance by B·T; None when skipping (materialize=False)."""
        if self._done:
            raise StopIteration
        step = self.batch_size * self.seq_len
        while self._buffered < step + 1:
            if not self._fetch():
                self._done = True
                self.close()
                raise StopIteration
        out = None
        if materialize:
            out = np.empty(step + 1, dtype=np.int64)
            filled = 0
            for _, _, tokens, start in self._chunks:
                take = min(len(tokens) - start, step + 1 - filled)
                out[filled:filled + take] = tokens[start:start + take]
                filled += take
                if filled == step + 1:
                    break
        remaining = step
        while remaining:
            chunk = self._chunks[0]
            available = len(chunk[2]) - chunk[3]
            if available <= remaining:
                self._chunks.popleft()
                remaining -= available
            else:
                chunk[3] += remaining
                remaining = 0
        self._buffered -= step
        self._drop_empty_front()
        return out

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        window = torch.from_numpy(self._window())
        if self._device.type == "cuda":
            window = window.pin_memory().to(self._device, non_blocking=True)
        elif self._device.type != "cpu":
            window = window.to(self._device)
        return window[:-1].view(self.batch_size, self.seq_len), window[1:].view(self.batch_size, self.seq_len)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as `next(loader)`."""
        return next(self)

    def skip(self, batches: int) -> None:
        """Advance by `batches` batches without building them (same position as calling next() that often)."""
        for _ in range(batches):
            self._window(materialize=False)

    # ------------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Stop the prefetch threads (queued row groups are dropped); the loader is unusable afterwards
        except for `state_dict()`."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._next = None
            for _, _, job in self._pending:
                job.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _doc_stream(row_groups: list[tuple[Path, int]], tokenizer, chunk_docs: int = 64) -> Iterator[np.ndarray]:
    """The token stream of `row_groups` ([BOS] + ids per document, in order, looping), tokenized a few documents
    at a time: the same tokens as `_tokenize_row_group`, without tokenizing a whole row group up front.
    Chunks grow 1, 2, 4, … up to `chunk_docs` documents per row group: a short pass over long documents
    (an eval of a few thousand tokens) then tokenizes about what it reads, not 64 documents."""
    bos = int(tokenizer.bos_id)
    while True:
        produced = 0
        for path, index in row_groups:
            texts = pq.ParquetFile(path).read_row_group(index, columns=["text"]).column(0).to_pylist()
            start, size = 0, 1
            while start < len(texts):
                chunk, start, size = texts[start:start + size], start + size, min(2 * size, chunk_docs)
                flat: list[int] = []
                for ids in tokenizer.encode_batch([t if t is not None else "" for t in chunk]):
                    flat.append(bos)
                    flat.extend(ids)
                produced += len(flat)
                yield np.array(flat, dtype=np.int64)
        if not produced:
            raise InputError("the split yields no tokens: rebuild the dataset with the data stage")


def iter_eval_batches(dataset_dir: Path, tokenizer, batch_size: int, seq_len: int, max_tokens: int,
                      rank: int = 0, world_size: int = 1, device: str = "cpu",
                      split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed pass over the start of a split (val by default) for bits-per-byte: the same batches on every call.

    Exactly `steps = max(1, max_tokens // (batch_size * seq_len))` batches per rank, i.e. steps·B·T target
    tokens per rank (at most max_tokens, or one batch when max_tokens < B·T); callers with a global budget pass
    `eval_tokens // world_size`. Every rank yields the same number of batches (safe around collectives):
    - when the split has at least `world_size` row groups, rank r reads its strided row groups
      (as TokenLoader) from the start of epoch 0;
    - otherwise (a small split, e.g. one row group) every rank reads the single stream and takes
      batches r, r+W, r+2W, … of it, so the ranks still see disjoint tokens.
    The stream wraps around to its start if it is shorter than what is asked (tokens are then repeated).
    The batches are TokenLoader's (B·T+1-token windows advancing by B·T), but documents are tokenized a few
    at a time, so a pass costs the tokens it reads, not whole row groups.
    """
    steps = max(1, max_tokens // (batch_size * seq_len))
    row_groups, _ = _split_row_groups(Path(dataset_dir), split)
    strided = len(row_groups) >= world_size
    mine = row_groups[rank::world_size] if strided else row_groups
    stream, buf = _doc_stream(mine, tokenizer), np.empty(0, dtype=np.int64)
    step = batch_size * seq_len
    dev = torch.device(device)
    for i in range(steps * (1 if strided else world_size)):
        while len(buf) < step + 1:
            buf = np.concatenate([buf, next(stream)])
        window, buf = buf[: step + 1], buf[step:]
        if not strided and i % world_size != rank:  # batch rank + i·W of the shared stream
            continue
        t = torch.from_numpy(window.copy()).to(dev)
        yield t[:-1].view(batch_size, seq_len), t[1:].view(batch_size, seq_len)
