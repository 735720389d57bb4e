"""Pretraining data loader: the token stream, rank striding, exact resume, single pass, val batches."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.config import DataConfig, LocalSource, TokenizerConfig
from model.data.dataset import build, list_shards
from model.errors import InputError
from model.data.loader import TokenLoader, iter_eval_batches
from model.data.tokenizer import Tokenizer, train

_SYLLABLES = "ka to ri me su na lo vi de pa ru sho ten mi ga bel or an is ex ul".split()
_wrng = random.Random(11)
WORDS = ("the of and to in is was for on that with as by at from they have this which one had were but not".split()
         + ["".join(_wrng.choice(_SYLLABLES) for _ in range(_wrng.randint(1, 4))) for _ in range(600)])


def _doc(rng: random.Random, i: int) -> str:
    # Mostly short documents, some long ones (longer than a whole batch window) and some one-word ones.
    n = rng.choice([1, 2, 5, 8, 12, 20, 30, 40, 200])
    return f"Doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice(".!?")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A real data-stage artifact: ~1045 train docs -> train_00000 (64 row groups of 16) + train_00001
    (2 row groups); ~55 val docs -> 4 row groups."""
    root = tmp_path_factory.mktemp("loader")
    rng = random.Random(7)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": _doc(rng, i)}) + "\n" for i in range(1100)))
    out = root / "dataset"
    out.mkdir()
    cfg = DataConfig(sources=[LocalSource(paths=[str(corpus)])], docs_per_shard=1024, row_group_size=16)
    build(cfg, out, root / "downloads")
    return out


@pytest.fixture(scope="module")
def tok(dataset, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tokenizer")
    train(TokenizerConfig(vocab_size=512, reference_encodings=[]), dataset, out, download_dir=None)
    return Tokenizer.load(out)


def _row_group_texts(dataset: Path, split: str) -> list[list[str]]:
    """The split's row groups in global order (shard order, then row-group order), read independently."""
    groups = []
    for path in list_shards(dataset, split):
        f = pq.ParquetFile(path)
        groups.extend(f.read_row_group(i).column("text").to_pylist() for i in range(f.num_row_groups))
    return groups


def _stream(tok: Tokenizer, groups: list[list[str]]) -> np.ndarray:
    return np.array([t for texts in groups for text in texts for t in [tok.bos_id, *tok.encode(text)]], dtype=np.int64)


def _take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_dataset_shape(dataset):
    # The fixture is what the other tests assume: several shards, row groups of 16, a partial last one.
    sizes = [len(g) for g in _row_group_texts(dataset, "train")]
    assert [p.name for p in list_shards(dataset, "train")] == ["train_00000.parquet", "train_00001.parquet"]
    assert pq.ParquetFile(list_shards(dataset, "train")[0]).num_row_groups == 64
    assert sizes[:64] == [16] * 64 and 66 <= len(sizes) <= 67 and 0 < sizes[-1] <= 16
    assert len(_row_group_texts(dataset, "val")) >= 2


@pytest.mark.parametrize("threads", [0, 3])
def test_stream_is_bos_plus_each_document_in_order(dataset, tok, threads):
    B, T = 3, 40
    ref = _stream(tok, _row_group_texts(dataset, "train"))
    batches = list(TokenLoader(dataset, "train", tok, B, T, threads=threads, loop=False))
    assert len(batches) == (len(ref) - 1) // (B * T)  # single pass: the tail shorter than a window is dropped
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
    xs = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()
    ys = torch.cat([y.reshape(-1) for _, y in batches]).numpy()
    n = len(xs)
    np.testing.assert_array_equal(xs, ref[:n])
    np.testing.assert_array_equal(ys, ref[1:n + 1])  # y is x shifted by one, across batch boundaries too
    # the texts themselves: the stream starts with BOS and its documents decode back, in order
    docs = [d for texts in _row_group_texts(dataset, "train") for d in texts]
    decoded = _docs_in(xs, tok)
    assert xs[0] == tok.bos_id and len(decoded) >= len(docs) - 2 and decoded == docs[:len(decoded)]


def test_resume_is_exact_across_row_group_shard_and_epoch_boundaries(dataset, tok):
    B, T = 2, 24
    step = B * T
    per_epoch = len(_stream(tok, _row_group_texts(dataset, "train")))
    total = (2 * per_epoch + per_epoch // 3) // step  # batches reaching well into the third epoch
    straight = TokenLoader(dataset, "train", tok, B, T, threads=2)
    ref, states = [], [straight.state_dict()]
    for _ in range(total):
        ref.append(next(straight))
        states.append(straight.state_dict())
    straight.close()
    assert states[0] == {**states[-1], "epoch": 0, "row_group": 0, "offset": 0}
    assert states[-1]["epoch"] == 2

    def first(pred):
        return next(m for m, s in enumerate(states) if pred(s))

    points = {
        "start": 0,
        "one batch": 1,
        "first row group crossed": first(lambda s: s["row_group"] >= 1),
        "inside shard 1": first(lambda s: s["row_group"] >= 64),
        "epoch 1": first(lambda s: s["epoch"] == 1),
        "mid epoch 1": first(lambda s: s["epoch"] == 1 and s["row_group"] >= 30),
        "last row group of epoch 1": first(lambda s: s["epoch"] == 1 and s["row_group"] == 65),
    }
    for name, m in points.items():
        n = min(max(m, 40), total - m)  # N = 2m batches where the reference run is long enough
        saved = json.loads(json.dumps(states[m]))  # the state is JSON-serialisable and survives the trip
        with TokenLoader(dataset, "train", tok, B, T, state=saved, threads=[0, 1, 4][m % 3]) as resumed:
            got = _take(resumed, n)
            assert resumed.state_dict() == states[m + n], name
        assert _same(got, ref[m:m + n]), f"resume at {name} (batch {m}, state {saved}) diverged"
    # the straight run crossed every kind of boundary inside the resumed stretches
    assert points["inside shard 1"] < points["epoch 1"] < points["mid epoch 1"]


def test_resume_exactly_at_a_row_group_boundary(dataset, tok):
    # One window that ends exactly at the end of row group 0: the state then points at (row group 1, offset 0).
    first_group = _stream(tok, _row_group_texts(dataset, "train")[:1])
    T = len(first_group)
    straight = TokenLoader(dataset, "train", tok, 1, T, threads=0)
    ref = _take(straight, 3)
    straight = TokenLoader(dataset, "train", tok, 1, T, threads=0)
    next(straight)
    state = straight.state_dict()
    assert (state["epoch"], state["row_group"], state["offset"]) == (0, 1, 0)
    assert _same(_take(TokenLoader(dataset, "train", tok, 1, T, state=state, threads=2), 2), ref[1:])


def test_resume_on_a_second_rank(dataset, tok):
    B, T = 2, 32
    half = len(_stream(tok, _row_group_texts(dataset, "train")[1::2])) // (B * T)  # rank 1's batches per epoch
    straight = TokenLoader(dataset, "train", tok, B, T, rank=1, world_size=2, threads=0)
    ref = _take(straight, half + 20)
    assert straight.state_dict()["epoch"] == 1
    m = half - 10  # resume shortly before the epoch ends, finish in the next epoch
    first = TokenLoader(dataset, "train", tok, B, T, rank=1, world_size=2, threads=0)
    _take(first, m)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TokenLoader(dataset, "train", tok, B, T, rank=1, world_size=2, state=state)
    assert _same(_take(resumed, len(ref) - m), ref[m:])


def _docs_in(stream: np.ndarray, tok: Tokenizer) -> list[str]:
    """Complete documents in a token stream (split at BOS; the last one may be cut off and is dropped)."""
    starts = np.flatnonzero(stream == tok.bos_id).tolist()
    return [tok.decode(stream[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]


def test_two_ranks_read_disjoint_row_groups_covering_the_split(dataset, tok):
    B, T = 2, 8
    groups = _row_group_texts(dataset, "train")
    seen = []
    for rank in range(2):
        batches = list(TokenLoader(dataset, "train", tok, B, T, rank=rank, world_size=2, loop=False))
        stream = np.concatenate([torch.cat([x.reshape(-1) for x, _ in batches]).numpy(), batches[-1][1][-1, -1:].numpy()])
        expected = _stream(tok, groups[rank::2])  # row groups rank, rank + 2, rank + 4, ...
        np.testing.assert_array_equal(stream, expected[:len(stream)])
        assert len(expected) - len(stream) < B * T  # only a tail shorter than a window is left unread
        seen.append(_docs_in(stream, tok))
    all_docs = [d for texts in groups for d in texts]
    assert len(set(all_docs)) == len(all_docs)  # "Doc i:" prefixes make every document unique
    assert not set(seen[0]) & set(seen[1])
    missing = set(all_docs) - set(seen[0]) - set(seen[1])
    assert len(missing) <= 2  # at most the last (cut-off) document of each rank
    assert len(seen[0]) + len(seen[1]) >= len(all_docs) - 2
    # BOS counts: each rank holds the documents of its own row groups
    assert len(seen[0]) >= sum(len(g) for g in groups[0::2]) - 1
    assert len(seen[1]) >= sum(len(g) for g in groups[1::2]) - 1


def test_single_pass_terminates_and_stays_exhausted(dataset, tok):
    loader = TokenLoader(dataset, "val", tok, 2, 16, loop=False)
    n = sum(1 for _ in loader)
    assert n == (len(_stream(tok, _row_group_texts(dataset, "val"))) - 1) // 32
    with pytest.raises(StopIteration):
        next(loader)
    assert loader.state_dict()["epoch"] == 0


def test_endless_loop_starts_a_new_epoch(dataset, tok):
    per_epoch = len(_stream(tok, _row_group_texts(dataset, "val")))
    loader = TokenLoader(dataset, "val", tok, 2, 16, threads=1)
    _take(loader, per_epoch // 32 + 3)
    assert loader.epoch == 1


def test_val_batches_are_deterministic(dataset, tok):
    B, T = 2, 16
    ref = _stream(tok, _row_group_texts(dataset, "val"))
    a = list(iter_eval_batches(dataset, tok, B, T, max_tokens=10 * B * T + 5))
    b = list(iter_eval_batches(dataset, tok, B, T, max_tokens=10 * B * T + 5))
    assert len(a) == 10 and _same(a, b)
    np.testing.assert_array_equal(a[0][0].reshape(-1).numpy(), ref[:B * T])  # the start of the val split
    assert len(list(iter_eval_batches(dataset, tok, B, T, max_tokens=1))) == 1  # at least one batch
    # more than the split holds: wraps around, same count on every rank
    long = list(iter_eval_batches(dataset, tok, B, T, max_tokens=2 * len(ref)))
    assert len(long) == 2 * len(ref) // (B * T)
    # the same batches as the training loader's pass over the split (tokenized a few documents at a time)
    loader = TokenLoader(dataset, "val", tok, B, T, threads=0)
    assert _same(long, [next(loader) for _ in range(len(long))])


def test_val_batches_on_several_ranks(dataset, tok):
    B, T = 2, 16
    groups = _row_group_texts(dataset, "val")
    # as many row groups as ranks: strided row groups
    for rank in range(2):
        got = list(iter_eval_batches(dataset, tok, B, T, max_tokens=5 * B * T, rank=rank, world_size=2))
        np.testing.assert_array_equal(torch.cat([x.reshape(-1) for x, _ in got]).numpy(),
                                      _stream(tok, groups[rank::2])[:5 * B * T])
    # more ranks than row groups: every rank takes every W-th batch of the one val stream
    W = len(groups) + 1
    single = list(iter_eval_batches(dataset, tok, B, T, max_tokens=3 * W * B * T))
    for rank in (0, W - 1):
        got = list(iter_eval_batches(dataset, tok, B, T, max_tokens=3 * B * T, rank=rank, world_size=W))
        assert _same(got, single[rank::W])


def _raises_one_line(match: str, **kwargs):
    with pytest.raises(InputError, match=match) as e:
        TokenLoader(**kwargs)
    assert "\n" not in str(e.value) and "start a fresh run" in str(e.value)
    return str(e.value)


def test_mismatched_resume_is_an_input_error(dataset, tok, tmp_path):
    loader = TokenLoader(dataset, "train", tok, 2, 16, world_size=2, threads=0)
    _take(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))
    base = dict(dataset_dir=dataset, split="train", tokenizer=tok, batch_size=2, seq_len=16, world_size=2, state=state)
    msg = _raises_one_line("world_size", **{**base, "world_size": 4})
    assert "same nproc" in msg
    _raises_one_line("batch_size x seq_len", **{**base, "batch_size": 4})
    _raises_one_line("batch_size x seq_len", **{**base, "seq_len": 32})
    _raises_one_line("rank", **{**base, "rank": 1})
    _raises_one_line("split", **{**base, "split": "val"})
    _raises_one_line("version", **{**base, "state": {**state, "version": 99}})
    # another dataset: same file names, different contents
    other = tmp_path / "other"
    other.mkdir()
    for path in list_shards(dataset, "train") + list_shards(dataset, "val"):
        texts = pq.read_table(path).column("text").to_pylist()[:-1]
        pq.write_table(pa.table({"text": texts}), other / path.name, row_group_size=16)
    _raises_one_line("shards", **{**base, "dataset_dir": other})
    # an offset the dataset cannot hold surfaces on the first batch, also as an InputError
    bad = TokenLoader(dataset, "train", tok, 2, 16, world_size=2, state={**state, "offset": 10**9}, threads=0)
    with pytest.raises(InputError, match="beyond"):
        next(bad)
    # and the matching resume works
    next(TokenLoader(**base))


def test_more_ranks_than_row_groups_is_an_input_error(dataset, tok, tmp_path):
    groups = len(_row_group_texts(dataset, "val"))
    with pytest.raises(InputError, match=f"{groups} row group") as e:
        TokenLoader(dataset, "val", tok, 2, 16, rank=groups, world_size=groups + 1)
    assert "\n" not in str(e.value)
    TokenLoader(dataset, "val", tok, 2, 16, rank=groups - 1, world_size=groups + 1)  # this rank still has one
    with pytest.raises(InputError, match="no train shards"):
        TokenLoader(tmp_path, "train", tok, 2, 16)


def test_loader_throughput(tok, tmp_path):
    """Prints the loader's tokens/s on ~3 MB of text (pytest -s); asserts only that it ran."""
    rng = random.Random(3)
    docs = [_doc(rng, i) for i in range(13_000)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "train_00000.parquet", row_group_size=1024)
    megabytes = sum(len(d) for d in docs) / 1e6
    B, T = 8, 512
    for threads in (0, 4):
        start = time.perf_counter()
        tokens = sum(x.numel() for x, _ in TokenLoader(tmp_path, "train", tok, B, T, threads=threads, loop=False))
        seconds = time.perf_counter() - start
        print(f"\nloader: {tokens} tokens from {megabytes:.1f} MB of text in {seconds:.2f} s = "
              f"{tokens / seconds / 1e6:.2f} M tokens/s (threads={threads}, B={B}, T={T}, vocab {tok.vocab_size})")
        assert tokens > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, non-blocking copy)")
def test_cuda_batches_equal_cpu_batches(dataset, tok):
    cpu = _take(TokenLoader(dataset, "train", tok, 2, 16, threads=0), 5)
    gpu = _take(TokenLoader(dataset, "train", tok, 2, 16, device="cuda"), 5)
    assert all(x.is_cuda and y.is_cuda for x, y in gpu)
    assert _same(cpu, [(x.cpu(), y.cpu()) for x, y in gpu])


def test_read_ahead_threads_follow_the_cores(monkeypatch):
    from model.data import loader

    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader.default_threads(2) == 1  # one core: one row group ahead per stream, no more
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader.default_threads(1) == 4 and loader.default_threads(8) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes share the 16 cores
    assert loader.process_cores() == 2 and loader.default_threads(2) == 1


def test_val_stream_equals_whole_row_groups_tokenized(dataset, tok):
    """The eval stream tokenizes growing chunks of documents; the tokens are those of whole row groups."""
    from model.data.loader import _doc_stream, _split_row_groups

    groups, _ = _split_row_groups(dataset, "val")
    expected = _stream(tok, _row_group_texts(dataset, "val"))
    stream, got = _doc_stream(groups, tok), []
    while sum(len(c) for c in got) < len(expected):
        got.append(next(stream))
    assert np.array_equal(np.concatenate(got)[: len(expected)], expected)
