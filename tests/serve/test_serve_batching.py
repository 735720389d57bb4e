"""Continuous batching in the server: concurrent requests, each with its own settings, get what the engine
gives each alone; a client that hangs up mid-batch frees its row for a queued request."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")

HELLO = [{"role": "user", "content": "Hello! Who are you?"}]


@pytest.fixture(scope="module")
def solo(tiny_checkpoint):
    """The engine alone on one prompt: (text without the end token, finish reason, completion tokens)."""
    from model.chat.conversation import fit_completion
    from model.chat.engine import Engine
    from model.nn.load import load_model

    model, tok = load_model(tiny_checkpoint, "cpu")
    engine = Engine(model, tok)
    end = {tok.special_id("<|assistant_end|>"), tok.bos_id}

    def run(messages, max_tokens: int, temperature: float, top_k: int | None, seed: int):
        prompt, budget = fit_completion(messages, tok, model.config.sequence_len, max_tokens)
        ids, _ = engine.generate_batch([prompt], budget, temperature=temperature, top_k=top_k, seed=seed)[0]
        stopped = bool(ids) and ids[-1] in end
        return tok.decode([t for t in ids if t not in end]), "stop" if stopped else "length", len(ids)

    return run


def test_concurrent_requests_each_get_their_solo_tokens(server, solo):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)
    cases = [(HELLO, 24, 0.0, None, 1), (HELLO, 30, 1.0, None, 2), (HELLO, 30, 1.0, None, 3), (HELLO, 12, 0.7, 5, 4),
             ([{"role": "user", "content": "What is 1+2?"}], 40, 1.3, 40, 5),
             ([{"role": "user", "content": "the quick brown fox"}], 20, 0.9, None, 6), (HELLO, 5, 1.0, 3, 7),
             ([{"role": "user", "content": "a"}], 33, 0.0, None, 8)] * 2

    def ask(case):
        messages, max_tokens, temperature, top_k, seed = case
        extra = {"top_k": top_k} if top_k else {}
        if seed % 2:  # half of them stream
            chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, seed=seed,
                                                         temperature=temperature, extra_body=extra, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, seed=seed,
                                           temperature=temperature, extra_body=extra)
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(len(cases)) as ex:
        got = list(ex.map(ask, cases))
    expected = [solo(*case)[:2] for case in cases]
    assert got == expected
    assert len({text for text, _ in got}) > 4  # different settings and seeds, different replies


def SlowedEngine(model, tok):
    """The real engine, 30 ms per forward pass and never choosing an end token, so replies last and overlap."""
    from helpers import patched_engine

    return patched_engine(model, tok, delay=0.03, no_end=True)


def test_a_client_that_hangs_up_mid_batch_frees_its_row(tiny_checkpoint, start_server):
    from serve.app import create_app
    from serve.workers import WorkerPool

    pool = WorkerPool(tiny_checkpoint, device="cpu", workers=1, batch_size=2, engine_factory=SlowedEngine)
    body = {"messages": HELLO, "max_tokens": 40, "stream": True, "temperature": 1.0}
    try:
        with start_server(create_app(pool, model_id="slowed")) as s:
            url = f"{s.url}/v1/chat/completions"
            first_token: dict[str, float] = {}
            finished: dict[str, float] = {}

            c_queued = threading.Event()

            def stream(name: str, hang_up: bool = False):
                with httpx.stream("POST", url, json={**body, "seed": len(name)}, timeout=30) as r:
                    for line in r.iter_lines():
                        if '"content"' in line and name not in first_token:
                            first_token[name] = time.time()
                            if hang_up:  # once c waits for a row
                                c_queued.wait(10)
                                return
                finished[name] = time.time()

            a = threading.Thread(target=stream, args=("a", True))
            b = threading.Thread(target=stream, args=("bb",))
            a.start(), b.start()
            assert _wait(lambda: pool.status()["active"] == 2)
            c = threading.Thread(target=stream, args=("ccc",))
            c.start()
            assert _wait(lambda: pool.status()["queued"] == 1)  # the batch is full: c waits
            c_queued.set()
            for t in (a, b, c):
                t.join(30)
            assert pool.stats["cancelled"] == 1 and pool.stats["completed"] >= 2
            assert first_token["ccc"] < finished["bb"]  # c took a's row while b was still decoding
            assert pool.status()["active"] == 0 and pool.status()["busy"] == 0
    finally:
        pool.close()


def _wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False
