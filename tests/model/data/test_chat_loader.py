"""Conversation loaders: packing, masking, padding and shuffling exactly as documented, streams independent of
the process count, and exact resume from a JSON state."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chat_data import arithmetic, write_conversations
from helpers import small_bpe
from model.chat.conversation import render
from model.data.chat_loader import (MAX_CONVERSATION_CHARS, Conversations, PackedStream, PaddedBatches, collate,
                                    packed_eval_batches, padded_eval_batches)
from model.errors import InputError


@pytest.fixture(scope="module")
def tok():
    return small_bpe("What is 12 + 30? 12 + 30 = 42. Hello there, how are you? I am fine.", 300)


CONVS = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me see."}, {"type": "python", "text": "1 + 2"},
                                       {"type": "python_output", "text": "3"}, {"type": "text", "text": "It is 3."}]}],
    [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "I am fine."},
     {"role": "user", "content": "Good."}, {"role": "assistant", "content": "Thanks!"}],
] + arithmetic(7, seed=1)


@pytest.fixture(scope="module")
def convs(tmp_path_factory):
    d = write_conversations(tmp_path_factory.mktemp("convs"), CONVS, arithmetic(5, seed=2))
    return Conversations(d, "train")


def stream_of(tok, s, S, mask=False):
    ids, masks = [], []
    for c in CONVS[s::S]:
        a, m = render(c, tok)
        ids += a
        masks += m
    return np.array(masks if mask else ids)


def test_packed_rows_are_the_stream_of_every_sth_conversation(tok, convs):
    S, B, T = 3, 2, 8
    for s in range(S):
        expect = stream_of(tok, s, S)
        ld = PackedStream(convs, tok, s, S, B, T)
        assert np.array_equal(ld.tokens, expect)
        flat = np.concatenate([expect] * 20)  # the stream, epoch after epoch
        for k in range(6):  # enough to wrap around several epochs
            x, y = ld.next_batch()
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
            rows = flat[k * B * (T + 1):(k + 1) * B * (T + 1)].reshape(B, T + 1)
            assert np.array_equal(x.numpy(), rows[:, :-1]) and np.array_equal(y.numpy(), rows[:, 1:])  # loss on every token
        assert ld.state_dict()["epoch"] == 6 * B * (T + 1) // len(expect) > 0


def test_mask_loss_sets_targets_of_context_tokens_to_minus_one(tok, convs):
    S, B, T = 2, 3, 10
    ld, plain = PackedStream(convs, tok, 1, S, B, T, mask_loss=True), PackedStream(convs, tok, 1, S, B, T)
    tokens, mask = np.tile(stream_of(tok, 1, S), 5), np.tile(stream_of(tok, 1, S, mask=True), 5)
    for k in range(4):
        (x, y), (x0, y0) = ld.next_batch(), plain.next_batch()
        assert torch.equal(x, x0)
        rows = tokens[k * B * (T + 1):(k + 1) * B * (T + 1)].reshape(B, T + 1)
        keep = mask[k * B * (T + 1):(k + 1) * B * (T + 1)].reshape(B, T + 1)[:, 1:] == 1
        assert np.array_equal(y.numpy(), np.where(keep, rows[:, 1:], -1))
        assert (y0 >= 0).all() and (y == -1).any() and (y >= 0).any()


def test_packed_state_round_trip_is_exact(tok, convs):
    S, B, T = 2, 2, 7
    straight = PackedStream(convs, tok, 0, S, B, T, mask_loss=True)
    first = PackedStream(convs, tok, 0, S, B, T, mask_loss=True)
    for _ in range(5):
        straight.next_batch(), first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    assert set(state) >= {"epoch", "pos"} and len(json.dumps(state)) < 300
    resumed = PackedStream(convs, tok, 0, S, B, T, mask_loss=True, state=state)
    for _ in range(5):
        a, b = straight.next_batch(), resumed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(InputError, match="rows=2 but this run has rows=3"):
        PackedStream(convs, tok, 0, S, 3, T, mask_loss=True, state=state)
    with pytest.raises(InputError, match="stream=0 but this run has stream=1"):
        PackedStream(convs, tok, 1, S, B, T, mask_loss=True, state=state)


def test_packed_eval_rows_do_not_depend_on_the_process_count(tok, tmp_path):
    val = Conversations(write_conversations(tmp_path, CONVS, CONVS), "val")
    B, T = 2, 6
    one = list(packed_eval_batches(val, tok, B, T, max_tokens=8 * B * T, mask_loss=True))
    halves = [list(packed_eval_batches(val, tok, B, T, max_tokens=4 * B * T, rank=r, world_size=2, mask_loss=True)) for r in range(2)]
    assert len(one) == 8 and [len(h) for h in halves] == [4, 4]
    rows = torch.cat([x for x, _ in one]), torch.cat([y for _, y in one])
    split = [torch.cat([x for x, _ in h]) for h in halves], [torch.cat([y for _, y in h]) for h in halves]
    for r in range(2):  # rank r holds rows r, r+2, …
        assert torch.equal(rows[0][r::2], split[0][r]) and torch.equal(rows[1][r::2], split[1][r])
    assert list(packed_eval_batches(Conversations(write_conversations(tmp_path / "e", CONVS, []), "val"), tok, B, T, 100)) == []


def test_collate_pads_and_masks(tok):
    a = render(CONVS[0], tok)
    b = render(CONVS[1], tok, max_tokens=9)  # truncated inside the user turn: nothing counts
    c = render(CONVS[2], tok)
    x, y, n = collate([a, b, c], pad_id=tok.special_id("<|assistant_end|>"))
    longest = max(len(a[0]), len(c[0]))
    assert x.shape == y.shape == (3, longest - 1) and n == len(a[0]) + len(b[0]) + len(c[0]) - 3
    for row, (ids, mask) in enumerate([a, b, c]):
        k = len(ids) - 1
        assert x[row, :k].tolist() == ids[:-1]
        assert (x[row, k:] == tok.special_id("<|assistant_end|>")).all()
        assert y[row, :k].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert (y[row, k:] == -1).all()
    assert (y[1] == -1).all()
    assert y[0, -1] == -1 and y[0, len(a[0]) - 2] == tok.special_id("<|assistant_end|>")


def test_padded_global_batches_cover_each_epoch_reshuffled(tok, convs):
    S, B, N = 2, 2, len(CONVS)  # E = 4: two steps per epoch, 2 conversations left out of each epoch
    lds = [PaddedBatches(convs, tok, s, S, B, max_tokens=64, seed=7) for s in range(S)]
    orders = []
    for epoch in range(3):
        seen = []
        for _ in range(N // (S * B)):
            for s, ld in enumerate(lds):
                assert ld.state_dict()["epoch"] == epoch
                idx = ld.indices()
                x, y, _ = ld.next_batch()
                assert x.shape[0] == B
                expect = collate([render(CONVS[i], tok, max_tokens=64) for i in idx], tok.special_id("<|assistant_end|>"))
                assert torch.equal(x, expect[0]) and torch.equal(y, expect[1])
                seen += idx
        order = lds[0].order(epoch)
        assert seen == order[:len(seen)].tolist() and len(set(seen)) == 8  # the global batches, in the epoch's order
        orders.append(order.tolist())
    assert orders[0] != orders[1] != orders[2]
    assert sorted(orders[0]) == list(range(N))
    assert PaddedBatches(convs, tok, 0, S, B, 64, seed=7).order(1).tolist() == orders[1]  # the seed fixes the order


def test_padded_state_round_trip_across_an_epoch_boundary(tok, convs):
    straight = PaddedBatches(convs, tok, 1, 2, 2, 16, seed=3)
    first = PaddedBatches(convs, tok, 1, 2, 2, 16, seed=3)
    for _ in range(3):
        straight.next_batch(), first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["batch"]) == (1, 1)
    resumed = PaddedBatches(convs, tok, 1, 2, 2, 16, seed=3, state=state)
    for _ in range(4):
        a, b = straight.next_batch(), resumed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
        assert a[0].shape[1] <= 15  # cut to max_tokens = 16
    with pytest.raises(InputError, match="seed=3 but this run has seed=4"):
        PaddedBatches(convs, tok, 1, 2, 2, 16, seed=4, state=state)


def test_padded_eval_splits_the_first_examples_over_ranks(tok, convs):
    one = list(padded_eval_batches(convs, tok, 2, 32, examples=5))
    assert [x.shape[0] for x, _ in one] == [2, 2, 1]
    two = [list(padded_eval_batches(convs, tok, 2, 32, examples=5, rank=r, world_size=2)) for r in range(2)]
    ys = sorted(tuple(y[y >= 0].tolist()) for part in two for _, yb in part for y in yb)
    assert ys == sorted(tuple(y[y >= 0].tolist()) for _, yb in one for y in yb)


def test_bad_data_is_a_one_line_error(tok, tmp_path):
    with pytest.raises(InputError, match="has no train.parquet: pass a conversations artifact"):
        Conversations(tmp_path, "train")
    empty = Conversations(write_conversations(tmp_path / "empty", [], []), "train")
    with pytest.raises(InputError, match="has no conversations"):
        PackedStream(empty, tok, 0, 1, 1, 8)
    with pytest.raises(InputError, match="has no conversations"):
        PaddedBatches(empty, tok, 0, 1, 1, 8, seed=0)
    few = Conversations(write_conversations(tmp_path / "few", CONVS[:3], []), "train")
    with pytest.raises(InputError, match="3 conversation.* but training reads 4 data streams"):
        PackedStream(few, tok, 0, 4, 1, 8)
    with pytest.raises(InputError, match="fewer than the 4 of one step"):
        PaddedBatches(few, tok, 0, 2, 2, 8, seed=0)
    huge = [[{"role": "user", "content": "x" * MAX_CONVERSATION_CHARS}, {"role": "assistant", "content": "ok"}]]
    bad_role = [[{"role": "assistant", "content": "first"}]]
    for name, conv, message in [("huge", huge, "train conversation 1 \\(test\\) is 1,000,0.. characters long"),
                                ("role", bad_role, "train conversation 1 \\(test\\): message 0 is 'assistant'")]:
        c = Conversations(write_conversations(tmp_path / name, CONVS[:1] + conv, []), "train")
        with pytest.raises(InputError, match=message) as e:
            PackedStream(c, tok, 0, 1, 1, 8)
        assert "\n" not in str(e.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "train.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="cannot read .* as a conversations table"):
        Conversations(tmp_path / "junk", "train")
