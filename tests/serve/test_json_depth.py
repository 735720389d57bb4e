"""Deeply nested JSON gets a 400 naming the limit (never a 500 from the parser's recursion), against a real
uvicorn server; brackets inside strings do not count, and the server keeps serving."""
from __future__ import annotations

import json

import httpx
import pytest

from serve.app import MAX_JSON_DEPTH, nested_deeper_than


class StubPool:
    """Stands in for the worker pool: a request that gets past parsing reaches `prepare`, which says so."""

    device, sequence_len = "cpu", 256

    def status(self) -> dict:
        return {"busy": 0, "free": 1, "queued": 0}

    def prepare(self, messages, limit):
        from model.errors import InputError

        raise InputError("reached the model")


@pytest.fixture(scope="module")
def stub_server(start_server):
    from serve.app import create_app

    with start_server(create_app(StubPool(), model_id="stub")) as s:
        yield s.url


def post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("body", [
    b'{"messages": [{"role": "user", "content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",  # valid JSON, absurdly deep
    b"[" * 100_000,  # never closed
    b'{"messages": [], "x": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}",
])
def test_deep_json_is_a_400(stub_server, body):
    r = post(stub_server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and f"more than {MAX_JSON_DEPTH} levels deep" in err["message"]
    assert httpx.get(f"{stub_server}/health", timeout=10).json()["status"] == "ok"


def test_brackets_in_strings_and_sane_nesting_pass(stub_server):
    content = "[" * 6000 + '{"\\"[' * 300  # text, however bracketed, is not nesting (within the 8000 characters)
    r = post(stub_server, json.dumps({"messages": [{"role": "user", "content": content}]}).encode())
    assert r.status_code == 400 and r.json()["error"]["message"] == "reached the model"
    nested = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "metadata": {"a": [[[[1]]]]}}
    r = post(stub_server, json.dumps(nested).encode())
    assert r.status_code == 400 and r.json()["error"]["message"] != "" and "levels deep" not in r.json()["error"]["message"]


def test_depth_scan():
    limit = MAX_JSON_DEPTH
    assert not nested_deeper_than(b"[" * limit + b"]" * limit)
    assert nested_deeper_than(b"[" * (limit + 1) + b"]" * (limit + 1))
    assert nested_deeper_than(b"{" * (limit + 1))
    assert not nested_deeper_than(json.dumps(["[" * 1000, "\\", '"' + "{" * 1000]).encode())
    assert not nested_deeper_than(json.dumps([[[["x"]]]] * 1000).encode())  # wide, not deep
    assert nested_deeper_than(b"[" * 40 + b'"a\\\\"' + b"[" * 40)  # an escaped backslash ends the escape
    assert not nested_deeper_than(b'["' + b"[" * 1000)  # an unterminated string hides what follows
