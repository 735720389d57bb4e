"""Shared fixtures: an isolated store and Prefect home per test session, a real Prefect server, and paths."""
from __future__ import annotations

import os
import subprocess
import sys
import json
import time
from pathlib import Path

import pytest

from helpers import free_port, train_inputs

ROOT = Path(__file__).resolve().parents[1]


# Nothing a test does may touch the user's ~/.cache/chatforge or ~/.prefect.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("CHATFORGE_EVAL_DIR", None)  # eval data comes only from what each test names
# No test leaves a background Prefect server behind (flows/background.py): a `chatforge run` without PREFECT_API_URL
# gets a temporary server for the run instead; tests/flows/test_background.py turns it back on, for its own homes.
os.environ["CHATFORGE_BACKGROUND_SERVER"] = "0"


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory):
    home = tmp_path_factory.mktemp("homes")
    os.environ["CHATFORGE_HOME"] = str(home / "chatforge")
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    yield


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own database; yields its API URL."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": "",
           # a run waiting for a key's concurrency slot (tasks/locks.py) asks again within 2 s, not up to 30 s
           "PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("prefect server did not become healthy in 180 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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
    r = subprocess.run([sys.executable, "-m", "model.train.base", str(spec)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    return out
