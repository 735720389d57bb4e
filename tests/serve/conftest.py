"""Fixtures for the chat server tests: a tiny trained checkpoint (built once per session) and a real
uvicorn server on a free port, started in a thread of this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import free_port, train_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint artifact directory (model.safetensors, model.json, tokenizer/) of a 2-layer GPT trained
    for 10 steps on a pseudo-English corpus with a 512-token vocabulary. It chats badly, which is fine."""
    from model.config import BaseConfig

    root = tmp_path_factory.mktemp("serve-ckpt")
    data, tok = train_inputs(root, docs=600)
    cfg = BaseConfig(depth=2, head_dim=32, max_seq_len=64, device_batch_size=4, total_batch_size=512, num_iterations=10,
                     eval_every=10, eval_tokens=512, sample_every=10, sample_tokens=2, checkpoint_every=1000,
                     muon_momentum_warmup=5, loader_threads=1, device="cpu")
    out = root / "out"
    out.mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps({"config": cfg.model_dump(mode="json"), "dataset_dir": str(data), "tokenizer_dir": str(tok),
                                "out_dir": str(out), "wip_dir": str(root / "wip"), "metrics_path": str(root / "metrics.json")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "model.train_base", str(spec)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    return out


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


class SlowEngine:
    """Stands in for `model.engine.Engine`: writes 'a' forever, 20 tokens a second, so that a reply is long
    enough to watch it stream and to cut it off."""

    def __init__(self, model, tok):
        self.token = tok.encode("a")[0]

    def generate(self, prompts, max_tokens, temperature=1.0, top_k=None, seed=42, num_samples=1):
        for _ in range(max_tokens):
            time.sleep(0.05)
            yield [(self.token, 1)]


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
