"""The OpenAI-compatible chat API against a real uvicorn server, through the official `openai` client:
completions (plain and streamed) whose usage matches the engine's own output, bad requests (4xx in
OpenAI's error shape, and the server keeps serving), concurrency, client disconnects, and `serve_main`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pathlib import Path

import httpx
import pytest

from helpers import free_port

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")

ROOT = Path(__file__).resolve().parents[2]
MODEL = "base/tiny-test"
HELLO = [{"role": "user", "content": "Hello! Who are you?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """What the engine itself generates for a prompt: (prompt ids, generated ids, text without the end token)."""
    from model.chat.conversation import render_for_completion
    from model.chat.engine import Engine
    from model.nn.load import load_model

    model, tok = load_model(tiny_checkpoint, "cpu")
    engine = Engine(model, tok)
    end = {tok.special_id("<|assistant_end|>"), tok.bos_id}

    def run(messages, max_tokens: int, temperature: float, top_k: int | None, seed: int):
        prompt = render_for_completion(messages, tok, max_tokens=model.config.sequence_len - min(max_tokens, model.config.sequence_len // 2))
        ids, _ = engine.generate_batch([prompt], max_tokens=min(max_tokens, model.config.sequence_len - len(prompt)),
                                       temperature=temperature, top_k=top_k, seed=seed)[0]
        text = tok.decode([t for t in ids if t not in end])
        return prompt, ids, text, bool(ids) and ids[-1] in end

    return run


def post(server, body, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{server}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60, **kw)
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60, **kw)
    return httpx.post(f"{server}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60, **kw)


# ------------------------------------------------------------------ info


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "chatforge"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    doc = httpx.get(f"{server}/openapi.json").json()
    assert "ChatCompletionRequest" in doc["components"]["schemas"] and "/v1/chat/completions" in doc["paths"]
    h = httpx.get(f"{server}/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["key"] == "0" * 64 and h["device"] == "cpu"
    assert h["context"] == 64
    assert h["workers"]["total"] == 2 and h["workers"]["busy"] + h["workers"]["free"] == 2


# ------------------------------------------------------------------ completions


def test_completion_matches_the_engine(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, temperature=0.9, seed=7,
                                       extra_body={"top_k": 40})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL and r.created > 0
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    prompt, ids, text, stopped = reference(HELLO, 24, 0.9, 40, 7)
    assert choice.message.content == text
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(ids) <= 24
    assert r.usage.total_tokens == len(prompt) + len(ids)


def test_streaming_matches_non_streaming(client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=30, temperature=1.0, seed=11)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason] and with_choices[-1].choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text and text == full.choices[0].message.content
    assert len([c for c in with_choices if c.choices[0].delta.content]) >= 2  # streamed in pieces, not at the end
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens)


def test_raw_sse_lines(server):
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60,
                      json={"messages": HELLO, "stream": True, "max_tokens": 5, "seed": 3}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["choices"][0]["delta"] == {}


def test_token_limits(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=3, temperature=0, seed=1)
    assert 1 <= r.usage.completion_tokens <= 3
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 3 else "stop")
    # more than the context holds: the reply ends when the context is full, with finish_reason "length"
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4096, temperature=0.7, seed=5)
    assert r.usage.total_tokens <= 64
    if r.choices[0].finish_reason == "length":
        assert r.usage.total_tokens == 64
    # a long conversation keeps its most recent turns inside the context
    long = [{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=long, max_tokens=10, seed=2)
    assert r.usage.prompt_tokens <= 64 - 10 and r.usage.total_tokens <= 64


def test_system_message_and_content_parts(client):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, seed=1)
    assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------ bad requests

BAD = {
    "messages not a list": ({"model": MODEL, "messages": "hello"}, "messages"),
    "messages missing": ({"model": MODEL}, "messages"),
    "messages empty": ({"messages": []}, "messages"),
    "temperature 5": ({"messages": HELLO, "temperature": 5}, "temperature"),
    "temperature a string": ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    "top_k 500": ({"messages": HELLO, "top_k": 500}, "top_k"),
    "max_tokens 0": ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    "max_tokens 5000": ({"messages": HELLO, "max_tokens": 5000}, "max_tokens"),
    "max_completion_tokens -1": ({"messages": HELLO, "max_completion_tokens": -1}, "max_completion_tokens"),
    "n 2": ({"messages": HELLO, "n": 2}, "n"),
    "stream not a bool": ({"messages": HELLO, "stream": [1]}, "stream"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    "content a number": ({"messages": [{"role": "user", "content": 42}]}, "content"),
    "content missing": ({"messages": [{"role": "user"}]}, "content"),
    "message not an object": ({"messages": ["hi"]}, "messages[0]"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}, "'user' was expected"),
    "two users in a row": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    "late system message": ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "system"),
    "only a system message": ({"messages": [{"role": "system", "content": "a"}]}, "user"),
    "9,000-character message": ({"messages": [{"role": "user", "content": "x" * 9000}]}, "8000"),
    "501 messages": ({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(501)]}, "500"),
    "33,000 characters in all": ({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 6600} for i in range(5)]}, "32000"),
    "content a dict": ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "content must be a string"),
    "body an array": ([1, 2], "JSON object"),
    "not UTF-8": (b"\xff\xfe{}", "UTF-8"),
    "malformed JSON": ('{"messages": [', "not valid JSON"),
    "empty body": ("", "empty"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_a_clear_4xx(server, name):
    body, needle = BAD[name]
    r = post(server, body)
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"] and "\n" not in err["message"] and len(err["message"]) < 300
    assert needle in err["message"], err["message"]


def test_body_is_json_whatever_its_content_type(server):
    body = json.dumps({"messages": HELLO, "max_tokens": 2, "temperature": None, "stream": None, "top_k": None})
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):  # e.g. curl -d
        r = httpx.post(f"{server}/v1/chat/completions", content=body.encode(), headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "chat.completion"


def test_huge_body_is_refused_before_it_is_read_whole(server):
    r = post(server, {"messages": HELLO, "padding": "z" * (2 << 20)})
    assert r.status_code == 413 and "MiB" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_bad_requests_through_the_client_and_server_survives(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 9000}])
    assert "8000" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}], stream=True)
    r = httpx.get(f"{server}/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(f"{server}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, seed=1).usage.completion_tokens >= 1


# ------------------------------------------------------------------ concurrency and disconnects


def test_concurrent_requests_all_complete(client, server):
    def ask(i: int):
        if i % 2:
            chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, seed=i, stream=True))
            return chunks[-1].choices[0].finish_reason
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, seed=i).choices[0].finish_reason

    before = httpx.get(f"{server}/health").json()["workers"]["completed"]
    with ThreadPoolExecutor(5) as ex:
        finishes = list(ex.map(ask, range(5)))
    assert all(f in ("stop", "length") for f in finishes)
    w = httpx.get(f"{server}/health").json()["workers"]
    assert w["completed"] - before == 5 and w["busy"] == 0 and w["queued"] == 0


@pytest.fixture(scope="module")
def slow_server(tiny_checkpoint, start_server, slow_engine):
    from serve.app import create_app
    from serve.workers import WorkerPool

    pool = WorkerPool(tiny_checkpoint, device="cpu", workers=1, engine_factory=slow_engine)
    with start_server(create_app(pool, model_id="slow")) as s:
        yield s.url, pool
    pool.close()


def _wait(pred, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_client_disconnect_stops_generation(slow_server):
    url, pool = slow_server
    body = {"messages": HELLO, "max_tokens": 4096, "stream": True}
    t0 = time.time()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"content":"a"' in line.replace(" ", ""):
                break  # one token arrived: hang up
    assert _wait(lambda: pool.stats["cancelled"] == 1 and pool.status()["busy"] == 0, 2.0), pool.status()
    assert time.time() - t0 < 2.0  # a full reply would take ~3 s
    # a non-streaming client that gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    assert _wait(lambda: pool.stats["cancelled"] == 2 and pool.status()["busy"] == 0, 2.0), pool.status()
    # a queued request whose client leaves is skipped; the worker then serves the next one
    first = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 16}, timeout=30))
    first.start()
    assert _wait(lambda: pool.status()["busy"] == 1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.2)
    first.join()
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "aaa"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert pool.stats["cancelled"] == 3 and pool.status()["busy"] == 0


def FailingEngine(model, tok):
    """Writes one token, then fails like a model that ran out of memory."""
    from helpers import patched_engine

    return patched_engine(model, tok, force="b", fail="CUDA out of memory (pretend)\nsecond line")


def test_a_failing_generation_answers_500_and_the_worker_carries_on(tiny_checkpoint, start_server):
    from serve.app import create_app
    from serve.workers import WorkerPool

    pool = WorkerPool(tiny_checkpoint, device="cpu", workers=1, engine_factory=FailingEngine)
    try:
        with start_server(create_app(pool, model_id="failing")) as s:
            client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
            for _ in range(2):
                with pytest.raises(openai.InternalServerError) as e:
                    client.chat.completions.create(model="failing", messages=HELLO)
                assert "CUDA out of memory (pretend)" in e.value.message and "second line" not in e.value.message
            with pytest.raises(openai.APIError, match="out of memory"):
                for _ in client.chat.completions.create(model="failing", messages=HELLO, stream=True):
                    pass
            assert pool.stats["failed"] == 3 and pool.status()["busy"] == 0
            assert httpx.get(f"{s.url}/health").json()["status"] == "ok"
    finally:
        pool.close()


def test_full_queue_answers_503(tiny_checkpoint, start_server):
    from serve.app import create_app
    from serve.workers import WorkerPool

    pool = WorkerPool(tiny_checkpoint, device="cpu", workers=1, max_queue=0)
    try:
        with start_server(create_app(pool, model_id="full")) as s:
            r = post(s.url, {"messages": HELLO})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    finally:
        pool.close()


def test_device_plans():
    import torch

    from serve.workers import plan_devices

    assert plan_devices("cpu", None) == ["cpu"]
    assert plan_devices("cpu", 3) == ["cpu"] * 3
    assert plan_devices("auto", None) == ([f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"])
    with pytest.raises(ValueError, match="unknown device"):
        plan_devices("tpu", None)
    with pytest.raises(ValueError, match="workers"):
        plan_devices("cpu", 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            plan_devices("cuda", None)
    else:
        n = torch.cuda.device_count()
        assert plan_devices("cuda", None) == [f"cuda:{i}" for i in range(n)]
        assert plan_devices("cuda", 2 * n) == [f"cuda:{i % n}" for i in range(2 * n)]


# ------------------------------------------------------------------ serve_main


def _committed(store_url: str, artifact_dir) -> str:
    """Commit the tiny checkpoint into a store under ref base/served; returns its key."""
    import hashlib
    import shutil

    from artifacts.manifest import Manifest
    from artifacts.store import Store

    store = Store(store_url)
    key = hashlib.sha256(b"serve-test-checkpoint").hexdigest()
    with store.staging(key) as tmp:
        for p in artifact_dir.rglob("*"):
            if p.is_file():
                (tmp / p.relative_to(artifact_dir)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, tmp / p.relative_to(artifact_dir))
        store.commit(tmp, Manifest(key=key, kind="checkpoint", stage="base", config={}, parents={}, code={}))
    store.set_ref("base/served", key)
    return key


def test_serve_main_resolves_a_ref_and_prints_the_url(tiny_checkpoint, tmp_path):
    from artifacts.errors import StoreError
    from serve.cli import serve_main

    store_url = str(tmp_path / "store")
    key = _committed(store_url, tiny_checkpoint)
    with pytest.raises(StoreError, match="unknown ref"):
        serve_main("base/missing", store_url, port=free_port())
    port = free_port()
    code = ("import sys; from serve.cli import serve_main; "
            f"sys.exit(serve_main('base/served', {store_url!r}, '127.0.0.1', {port}, None, 'cpu'))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"})
    try:
        line = ""
        deadline = time.time() + 60
        while "chat at" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "serve_main exited early"
        assert f"http://127.0.0.1:{port}/" in line, line
        assert _wait(lambda: _healthy(port), 30)
        h = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert h["model"] == "base/served" and h["key"] == key and h["workers"]["total"] == 1
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a graceful shutdown and exit status 0
        assert proc.wait(timeout=20) == 0, proc.stdout.read()[-2000:]


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
