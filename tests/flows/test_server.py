"""`chatforge server`: a real Prefect server plus served deployments, triggered through the REST API
the way the UI's "Run" button does, running the pipeline into a store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from helpers import free_port, sets_for, write_corpus
from tasks.registry import STAGES
from tasks.stage import upstream

pytestmark = pytest.mark.slow


def _wait(fn, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_trigger_pipeline_deployment_through_the_api(tmp_path):
    corpus = write_corpus(tmp_path / "docs.jsonl", docs=800)
    store = tmp_path / "store"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_UI_ENABLED="false")
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "server", "--port", str(port), "--store", str(store), *sets_for(corpus, vocab=600)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def deployment():
            try:
                r = httpx.get(f"{api}/deployments/name/chatforge/pipeline", timeout=2)
            except httpx.HTTPError:
                return None
            return r.json() if r.status_code == 200 else None

        dep = _wait(deployment, 240, "the pipeline deployment")
        assert dep["parameters"]["config"]["tokenizer"]["vocab_size"] == 600
        assert "tokenizer" in dep["parameter_openapi_schema"]["definitions"]["PipelineConfig"]["properties"]
        def create_run():
            # a freshly started server on a loaded machine can answer 503 (SQLite busy) for a moment
            # as a user who fills in the form's `until` (the whole DAG through the flow is test_pipeline_e2e's)
            r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": {"until": "tokenizer"}}, timeout=10)
            return r.json() if r.status_code == 201 else None

        run = _wait(create_run, 60, "the server to accept a flow run")

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=5).json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = _wait(finished, 240, "the triggered flow run")
        assert state["type"] == "COMPLETED", (tmp_path / "server.log").read_text()[-3000:]
        tasks = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}, timeout=5).json()
        assert sorted(t["name"].split("-")[0] for t in tasks) == sorted(s.name for s in upstream(STAGES, "tokenizer"))
        refs = json.loads((store / "refs" / "tokenizer" / "latest.json").read_text())
        assert (store / "artifacts" / refs["key"] / "manifest.json").exists()
        assert (store / "ledger" / run["id"]).is_dir()  # ledger rows carry the Prefect flow run id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
