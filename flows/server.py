"""`chatforge server`: a local Prefect server (UI at http://127.0.0.1:PORT) plus the served deployments
`chatforge/pipeline` and `chatforge-stage/stage`, so runs can be started from the UI's form."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(host: str, port: int, timeout: float = 180) -> subprocess.Popen | None:
    """Start `prefect server start` unless one already answers there; wait until it is healthy."""
    api = f"http://{host}:{port}/api"
    if _healthy(api):
        print(f"chatforge: using the Prefect server already running at {api}", file=sys.stderr)
        return None
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)])
    deadline = time.time() + timeout
    while not _healthy(api):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the Prefect server on {host}:{port} did not start (is the port taken?)")
        time.sleep(0.5)
    return proc


def serve_deployments(preset: str, sets: list[str], store: str | None) -> None:
    from prefect import serve

    from flows.overrides import build_config
    from flows.pipeline import pipeline, stage_flow

    config = build_config(preset, sets).model_dump(mode="json")
    serve(
        pipeline.to_deployment(
            name="pipeline", parameters={"config": config, "store": store},
            description=f"The whole chatforge DAG; defaults: the {preset!r} preset. Edit the config in the form.",
        ),
        stage_flow.to_deployment(
            name="stage", parameters={"stage": "tokenizer", "config": config, "store": store},
            description="Rerun one stage; its inputs are read from the store.",
        ),
    )


def main(host: str, port: int, preset: str, sets: list[str], store: str | None) -> int:
    os.environ["PREFECT_API_URL"] = f"http://{host}:{port}/api"
    proc = start_server(host, port)
    print(f"chatforge: Prefect UI at http://{host}:{port}; serving deployments chatforge/pipeline and chatforge-stage/stage", file=sys.stderr)
    try:
        serve_deployments(preset, sets, store)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0
