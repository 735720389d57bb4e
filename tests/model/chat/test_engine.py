"""The inference engine (KV cache, batching, sampling, stopping, calculator tool) and streaming text.

Reference: greedy decoding by full recomputation (`model(ids)` on the whole sequence at every step, no cache).

Scripted behaviour: to make a tiny random model emit a chosen sequence (tool use, stop tokens), `script`
wraps the real `GPT.forward_cached` (the cache path still runs) and raises one logit to 100 (the model's own
logits are soft-capped at ±15) whenever a row's previous token is a key of the script: a Markov chain
`previous token -> next token`.
"""
from __future__ import annotations

import pytest
import torch

from helpers import opinionated_gpt, script_logits as script, small_bpe
from model.config import SPECIAL_TOKENS
from model.chat.engine import Engine, KVCache
from model.errors import InputError
from model.nn.gpt import GPT
from model.chat.streaming import TextStream
from model.data.tokenizer import Tokenizer

SEQ = 48
TEXT = "Hello world, the quick brown fox. What is 1+2? 12*7=84. 日本語のテキスト, 中文, emoji 🙂🚀 and café."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A small byte-level BPE with the real special tokens (emoji and CJK stay split across tokens)."""
    return small_bpe(TEXT, 320, repeat=20)


def make_model(vocab: int, n_kv_head: int = 4, seed: int = 0) -> GPT:
    return opinionated_gpt(vocab, SEQ, n_kv_head=n_kv_head, seed=seed)


@torch.no_grad()
def reference_greedy(model: GPT, tok: Tokenizer, prompt: list[int], max_tokens: int) -> list[int]:
    ids, out = list(prompt), []
    stop = {tok.bos_id, tok.special_id("<|assistant_end|>")}
    while len(out) < max_tokens and len(ids) < model.config.sequence_len:
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token in stop:
            break
    return out


def prompts_of(tok: Tokenizer) -> list[list[int]]:
    bos, a = tok.bos_id, tok.special_id("<|assistant_start|>")
    return [[bos] + tok.encode("Hello world") + [a],
            [bos] + tok.encode("What is 1+2? the quick brown fox, 日本語") + [a],
            [bos, 200],
            [bos] + tok.encode("café 🙂")]


def steps_of(engine: Engine, *args, **kwargs) -> list[list]:
    return list(engine.generate(*args, **kwargs))


# ---------------------------------------------------------------- KV cache = full recomputation

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_greedy_equals_full_recomputation(tok, n_kv_head):
    model = make_model(tok.vocab_size, n_kv_head)
    engine = Engine(model, tok)
    prompts = prompts_of(tok)
    # max_tokens past the context: rows also stop at different steps as their context fills up
    expected = [reference_greedy(model, tok, p, 60) for p in prompts]
    assert len({len(e) for e in expected}) > 1  # the batch shrinks while it runs
    batched = engine.generate_batch(prompts, 60, temperature=0)
    assert [tokens for tokens, _ in batched] == expected
    assert all(mask == [1] * len(tokens) for tokens, mask in batched)
    for p, e in zip(prompts, expected):
        assert engine.generate_batch([p], 60, temperature=0)[0][0] == e
    for r, p in enumerate(prompts):
        assert len(p) + len(expected[r]) <= SEQ


def test_forward_cached_equals_forward(tok):
    model = make_model(tok.vocab_size, n_kv_head=2)
    ids = torch.randint(0, tok.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    lengths = [12, 7, 15]
    with torch.no_grad():
        cache = KVCache(model.config.n_layer, 3, 20, torch.device("cpu"))
        prefill = model.forward_cached(ids[:, :15], cache, last=torch.tensor(lengths) - 1)
        cache.set_lengths(lengths)
        for r, n in enumerate(lengths):
            assert torch.allclose(prefill[r], model(ids[r:r + 1, :n])[0, -1], atol=1e-4)
        for step in range(4):  # each row continues from its own length
            nxt = torch.stack([ids[r, n + step] for r, n in enumerate(lengths)])[:, None]
            logits = model.forward_cached(nxt, cache)
            cache.advance(1)
            for r, n in enumerate(lengths):
                assert torch.allclose(logits[r], model(ids[r:r + 1, :n + step + 1])[0, -1], atol=1e-4)


def test_samples_share_one_prefill(tok, monkeypatch):
    model = make_model(tok.vocab_size)
    prompts = prompts_of(tok)[:2]
    batches = []
    original = model.forward_cached
    monkeypatch.setattr(model, "forward_cached", lambda idx, *a, **k: batches.append(idx.shape) or original(idx, *a, **k))
    out = Engine(model, tok).generate_batch(prompts, 5, temperature=0, num_samples=3)
    assert batches[0] == (2, max(map(len, prompts)))  # one prefill row per distinct prompt
    assert all(shape[1] == 1 for shape in batches[1:])
    expected = [reference_greedy(model, tok, p, 5) for p in prompts]
    assert [tokens for tokens, _ in out] == [expected[0]] * 3 + [expected[1]] * 3  # prompt i -> rows i*n ...


# ---------------------------------------------------------------- sampling

def test_sampling_is_seeded_and_rows_differ(tok):
    engine = Engine(make_model(tok.vocab_size), tok)
    prompt = prompts_of(tok)[:1]
    a = engine.generate_batch(prompt, 12, temperature=1.0, seed=7, num_samples=4)
    b = engine.generate_batch(prompt, 12, temperature=1.0, seed=7, num_samples=4)
    c = engine.generate_batch(prompt, 12, temperature=1.0, seed=8, num_samples=4)
    assert a == b
    assert a != c
    assert len({tuple(tokens) for tokens, _ in a}) == 4


def test_top_k_1_equals_greedy(tok):
    engine = Engine(make_model(tok.vocab_size), tok)
    prompts = prompts_of(tok)
    assert engine.generate_batch(prompts, 10, temperature=1.0, top_k=1) == engine.generate_batch(prompts, 10, temperature=0)


def test_top_k_limits_the_choice(tok, monkeypatch):
    model = make_model(tok.vocab_size)
    engine = Engine(model, tok)
    prompt = [prompts_of(tok)[0]]
    allowed = set()
    original = model.forward_cached

    def record(idx, *a, **k):
        logits = original(idx, *a, **k)
        allowed.update(torch.topk(logits[0], 3).indices.tolist())
        return logits

    monkeypatch.setattr(model, "forward_cached", record)
    tokens, _ = engine.generate_batch(prompt, 1, temperature=5.0, top_k=3, num_samples=1)[0]
    assert tokens[0] in allowed


# ---------------------------------------------------------------- stopping

def test_max_tokens_is_respected(tok):
    engine = Engine(make_model(tok.vocab_size), tok)
    steps = steps_of(engine, prompts_of(tok), 3, temperature=1.0, num_samples=2)
    assert 1 <= len(steps) <= 3
    assert all(len(step) == 8 for step in steps)
    assert steps_of(engine, prompts_of(tok), 0) == []


@pytest.mark.parametrize("stop", ["<|assistant_end|>", "<|bos|>"])
def test_stop_tokens_end_a_row(tok, monkeypatch, stop):
    model = make_model(tok.vocab_size)
    bos, a = tok.bos_id, tok.special_id("<|assistant_start|>")
    stop_id = tok.special_id(stop)
    script(monkeypatch, model, {a: stop_id})
    prompts = [[bos, 20, a], [bos, 20, 21]]  # only the first row ends with <|assistant_start|>
    steps = steps_of(Engine(model, tok), prompts, 6, temperature=0)
    assert steps[0][0] == (stop_id, 1)
    assert all(step[0] is None for step in steps[1:])
    assert steps[0][1] is not None and steps[0][1][1] == 1  # the other row carries on


def test_too_long_or_bad_prompts_are_one_line_input_errors(tok):
    engine = Engine(make_model(tok.vocab_size), tok)
    cases = [
        ([[tok.bos_id] * SEQ], {}, "leaves no room in the model's context of 48"),
        ([[]], {}, "prompt 0 is empty"),
        ([[tok.bos_id, tok.vocab_size]], {}, "token ids outside"),
        ([[tok.bos_id]], {"temperature": -1.0}, "temperature must be ≥ 0"),
        ([[tok.bos_id]], {"num_samples": 0}, "num_samples must be"),
    ]
    for prompts, kwargs, message in cases:
        with pytest.raises(InputError) as e:
            engine.generate_batch(prompts, 4, **kwargs)
        assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the calculator tool

def tool_chain(tok: Tokenizer, expr: str) -> dict[int, int]:
    """assistant_start -> python_start -> expr tokens -> python_end; output_end -> assistant_end."""
    sp = tok.special_id
    path = [sp("<|assistant_start|>"), sp("<|python_start|>"), *tok.encode(expr), sp("<|python_end|>")]
    assert len(set(path)) == len(path)  # a Markov chain needs distinct tokens
    chain = dict(zip(path, path[1:]))
    chain[sp("<|output_end|>")] = sp("<|assistant_end|>")
    chain[sp("<|python_end|>")] = sp("<|assistant_end|>")  # what the model would do if nothing were forced
    return chain


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tool_use_forces_the_calculator_output(tok, monkeypatch, temperature):
    model = make_model(tok.vocab_size)
    sp = tok.special_id
    script(monkeypatch, model, tool_chain(tok, "1+2"))
    prompts = [[tok.bos_id] + tok.encode("What is 1+2?") + [sp("<|assistant_start|>")], [tok.bos_id, 200]]
    (tokens, mask), _ = Engine(model, tok).generate_batch(prompts, 20, temperature=temperature)
    call = [sp("<|python_start|>"), *tok.encode("1+2"), sp("<|python_end|>")]
    forced = [sp("<|output_start|>"), *tok.encode("3"), sp("<|output_end|>")]
    assert tokens == call + forced + [sp("<|assistant_end|>")]
    assert mask == [1] * len(call) + [0] * len(forced) + [1]


def test_a_refused_expression_forces_nothing(tok, monkeypatch):
    model = make_model(tok.vocab_size)
    sp = tok.special_id
    script(monkeypatch, model, tool_chain(tok, "fox"))
    prompt = [tok.bos_id, sp("<|assistant_start|>")]
    (tokens, mask), = Engine(model, tok).generate_batch([prompt], 20, temperature=0)
    assert tokens == [sp("<|python_start|>"), *tok.encode("fox"), sp("<|python_end|>"), sp("<|assistant_end|>")]
    assert mask == [1] * len(tokens)


# ---------------------------------------------------------------- streaming text

def test_token_bytes_are_the_raw_bytes(tok):
    ids = tok.encode(TEXT)
    assert b"".join(tok.token_bytes(i) for i in ids) == TEXT.encode("utf-8")
    assert all(tok.token_bytes(tok.special_id(name)) == b"" for name in SPECIAL_TOKENS)
    with pytest.raises(KeyError):
        tok.token_bytes(tok.vocab_size)


@pytest.mark.parametrize("text", ["emoji 🙂🚀 done", "日本語のテキスト", "中文 and café", TEXT])
def test_stream_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="ignore").encode()) != len(tok.token_bytes(i)) for i in ids)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some token completed no character by itself


def test_stream_skips_special_tokens_and_flushes_a_partial_character(tok):
    stream = TextStream(tok)
    ids = tok.encode("🙂")
    assert len(ids) > 1
    assert stream.push(tok.bos_id) == ""
    assert stream.push(ids[0]) == ""
    assert stream.push(tok.special_id("<|assistant_end|>")) == ""
    assert "".join(stream.push(i) for i in ids[1:]) == "🙂"
    assert stream.push(ids[0]) == ""
    assert stream.flush() == "\ufffd"  # the unfinished character at the end
    assert stream.push(tok.encode("a")[0]) == "a"  # and the stream starts clean
