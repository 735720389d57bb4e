"""Continuous batching: a request gets exactly the tokens `Engine.generate` gives it alone, whoever shares
its batch, whenever it joined, with its own sampling settings and seed; a removed request frees its row."""
from __future__ import annotations

import pytest
import torch

from helpers import opinionated_gpt, script_logits, small_bpe
from model.chat.batching import Batcher, Request
from model.chat.engine import Engine, KVCache
from model.errors import InputError
from model.nn.gpt import GPT

SEQ = 48
TEXT = "Hello world, the quick brown fox. What is 1+2? 12*7=84. café."


@pytest.fixture(scope="module")
def tok():
    return small_bpe(TEXT, 320, repeat=20)


def make_model(vocab: int, n_kv_head: int = 2) -> GPT:
    return opinionated_gpt(vocab, SEQ, n_kv_head=n_kv_head)


def requests_of(tok) -> list[Request]:
    bos, a = tok.bos_id, tok.special_id("<|assistant_start|>")
    prompts = [[bos] + tok.encode("Hello world") + [a], [bos, 200], [bos] + tok.encode("What is 1+2? the quick brown fox") + [a],
               [bos] + tok.encode("café"), [bos, 17, 18, 19], [bos] + tok.encode("12*7=84")]
    settings = [(0.0, None, 1), (1.0, None, 2), (0.7, 5, 3), (1.3, 40, 4), (1.0, None, 2), (0.0, None, 9)]
    max_tokens = [30, 40, 12, 60, 25, 7]
    return [Request(p, m, t, k, s) for p, m, (t, k, s) in zip(prompts, max_tokens, settings)]


def solo(engine: Engine, r: Request) -> tuple[list[int], list[int]]:
    return engine.generate_batch([r.prompt], r.max_tokens, r.temperature, r.top_k, r.seed)[0]


def run_staggered(batcher: Batcher, requests: list[Request], joins: list[int]) -> dict[int, tuple[list[int], list[int]]]:
    """Request i joins before step joins[i]; run until all have ended. Tokens and masks per request."""
    got = {id(r): ([], []) for r in requests}
    step, pending = 0, list(zip(joins, requests))
    while pending or batcher.active:
        for at, r in [p for p in pending if p[0] <= step]:
            pending.remove((at, r))
            outs = [batcher.add(r)]
            for out in outs:
                got[id(out.request)][0].append(out.token)
                got[id(out.request)][1].append(out.mask)
        for out in batcher.step():
            got[id(out.request)][0].append(out.token)
            got[id(out.request)][1].append(out.mask)
        step += 1
    return got


@pytest.mark.parametrize("n_kv_head,bucket", [(4, 64), (2, 64), (2, 8)])
def test_each_request_gets_its_solo_tokens(tok, monkeypatch, n_kv_head, bucket):
    monkeypatch.setattr(KVCache, "SPAN_BUCKET", bucket)  # 8: rows attend over spans of several sizes in one step
    engine = Engine(make_model(tok.vocab_size, n_kv_head), tok)
    assert engine.batch_invariant  # the CPU default
    requests = requests_of(tok)
    expected = [solo(engine, r) for r in requests]
    assert len({len(e[0]) for e in expected}) > 2  # requests end at different steps (stop, max_tokens, context)
    got = run_staggered(Batcher(engine, max_batch=8), requests, joins=[0, 0, 3, 3, 5, 11])
    assert [got[id(r)] for r in requests] == expected


def test_a_full_batch_queues_nothing_and_refills(tok):
    engine = Engine(make_model(tok.vocab_size), tok)
    requests = requests_of(tok)
    expected = [solo(engine, r) for r in requests]
    batcher = Batcher(engine, max_batch=2)
    got = {id(r): ([], []) for r in requests}
    waiting = list(requests)
    while waiting or batcher.active:
        while waiting and batcher.free:
            out = batcher.add(waiting.pop(0))
            got[id(out.request)][0].append(out.token)
            got[id(out.request)][1].append(out.mask)
        assert batcher.active <= 2
        for out in batcher.step():
            got[id(out.request)][0].append(out.token)
            got[id(out.request)][1].append(out.mask)
    assert [got[id(r)] for r in requests] == expected
    with pytest.raises(RuntimeError, match="full"):
        b = Batcher(engine, max_batch=1)
        b.add(Request([tok.bos_id, 5], 20, 0.0))
        b.add(Request([tok.bos_id, 6], 20, 0.0))


def test_removing_a_request_frees_its_row_and_the_others_carry_on(tok):
    engine = Engine(make_model(tok.vocab_size), tok)
    requests = [Request(r.prompt, 40, r.temperature, r.top_k, r.seed) for r in requests_of(tok)[:3]]
    expected = [solo(engine, r) for r in requests]
    batcher = Batcher(engine, max_batch=3)
    got = {id(r): [] for r in requests}
    for r in requests:
        got[id(r)].append(batcher.add(r).token)
    for _ in range(2):
        for out in batcher.step():
            got[id(out.request)].append(out.token)
    assert batcher.active == 3 and batcher.free == 0
    assert batcher.remove(requests[0]) and not batcher.remove(requests[0])
    assert batcher.active == 2 and batcher.free == 1 and batcher.cache.batch == 2
    late = Request(requests[0].prompt, 10, 1.0, None, 5)  # the freed row takes a new request
    got[id(late)] = [batcher.add(late).token]
    while batcher.active:
        for out in batcher.step():
            got[id(out.request)].append(out.token)
    assert got[id(requests[1])] == expected[1][0] and got[id(requests[2])] == expected[2][0]
    assert got[id(late)] == solo(engine, late)[0]


def test_tool_use_in_a_batch_matches_solo(tok, monkeypatch):
    model = make_model(tok.vocab_size)
    sp = tok.special_id
    path = [sp("<|assistant_start|>"), sp("<|python_start|>"), *tok.encode("1+2"), sp("<|python_end|>")]
    chain = dict(zip(path, path[1:]))
    chain[sp("<|output_end|>")] = sp("<|assistant_end|>")
    script_logits(monkeypatch, model, chain)  # the model "calls the calculator" after <|assistant_start|>
    engine = Engine(model, tok)
    requests = [Request([tok.bos_id] + tok.encode("What is 1+2?") + [sp("<|assistant_start|>")], 20, 1.0, None, 3),
                Request([tok.bos_id, 200], 20, 1.0, None, 4)]
    expected = [solo(engine, r) for r in requests]
    assert 0 in expected[0][1]  # forced tokens (mask 0) in the first request
    got = run_staggered(Batcher(engine, 4), requests, joins=[1, 0])
    assert [got[id(r)] for r in requests] == expected


@pytest.mark.parametrize("bucket", [64, 8])
def test_batched_logits_equal_solo_logits_bitwise(tok, monkeypatch, bucket):
    monkeypatch.setattr(KVCache, "SPAN_BUCKET", bucket)
    engine = Engine(make_model(tok.vocab_size), tok)
    prompts = [r.prompt for r in requests_of(tok)]
    batch = engine.new_cache(0, SEQ)
    caches = []
    for p in prompts:
        cache, _ = engine.prefill([p], 1)
        batch.append_row(cache)
        caches.append(cache)
    feed = torch.tensor([[7]] * len(prompts))
    with torch.inference_mode():
        batched = engine.model.forward_cached(feed, batch)
        assert len(batch._groups) == (1 if bucket == 64 else 2)  # rows of different spans in one step
        for i, cache in enumerate(caches):
            assert torch.equal(engine.model.forward_cached(feed[i:i + 1], cache)[0], batched[i])


def test_bad_requests_are_one_line_input_errors(tok):
    batcher = Batcher(Engine(make_model(tok.vocab_size), tok), 2)
    for r, message in [(Request([], 4), "prompt 0 is empty"), (Request([tok.bos_id], 4, -1.0), "temperature must be ≥ 0"),
                       (Request([tok.bos_id] * SEQ, 4), "leaves no room")]:
        with pytest.raises(InputError, match=message):
            batcher.add(r)
    assert batcher.active == 0
    assert batcher.add(Request([tok.bos_id], 0)).done
