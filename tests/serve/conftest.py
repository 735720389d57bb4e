"""Fixtures for the chat server tests: a tiny trained checkpoint (built once per session) and a real
uvicorn server on a free port, started in a thread of this process."""
from __future__ import annotations

import threading
import time

import pytest

from helpers import free_port, patched_engine



class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        import httpx

        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the chat server did not answer /health within 30 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the server did not shut down within 10 s: a request handler is stuck"


@pytest.fixture(scope="session")
def start_server():
    """`with start_server(app) as s:` serves an app on a free port; `s.url` is its base URL."""
    return ServerThread


def SlowEngine(model, tok):
    """Writes 'a' until the context is full, 10 tokens a second: a reply long enough to watch it stream and to
    cut it off."""
    return patched_engine(model, tok, delay=0.1, force="a")


@pytest.fixture(scope="session")
def slow_engine():
    return SlowEngine


@pytest.fixture(scope="session")
def pool(tiny_checkpoint):
    from serve.workers import WorkerPool

    p = WorkerPool(tiny_checkpoint, device="cpu", workers=2)
    yield p
    p.close()


@pytest.fixture(scope="session")
def server(pool, tiny_checkpoint):
    """The chat server over the tiny checkpoint with 2 CPU workers; yields its base URL."""
    from serve.app import create_app

    app = create_app(pool, model_id="base/tiny-test", key="0" * 64)
    with ServerThread(app) as s:
        yield s.url
