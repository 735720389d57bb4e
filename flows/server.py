"""`chatforge server`: Prefect the way a team runs it, in one command on one machine.

A Prefect server on HOST:PORT (its database under the chatforge home, telemetry off), the work pools
`chatforge-cpu` and `chatforge-gpu` (type process), the deployments of deploy/prefect.yaml applied with
`prefect deploy --all` (their defaults: the preset and --set given here), the automation that marks a
run Crashed when its heartbeats stop, and one `chatforge worker` per pool (or the pools `--workers` names:
on a team's first machine, the CPU pool only, the GPU machines running their own). Ctrl-C or SIGTERM stops all of
it in order: the workers first (their in-flight runs are cancelled, so training checkpoints and the runs end
Cancelled), then the Prefect server; a second signal kills what is left. A worker that dies on its own is
started again (a run it had becomes Crashed through the heartbeat automation and can be retried).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from flows.worker import POOLS, Signals, group_alive, request, signal_group, spawn
from model.errors import InputError

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
DEPLOYMENTS = {"chatforge-pipeline": "chatforge/chatforge-pipeline", "chatforge-stage": "chatforge-stage/chatforge-stage"}
AUTOMATION = "chatforge: crash flow runs whose heartbeats stopped"
HEARTBEAT_SECONDS = 30  # deploy/prefect.yaml's PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's minimum)
RESTARTS = 5  # a worker that keeps dying is reported, not restarted for ever


class StartupError(InputError):
    """A step of the start-up failed; the message says which and how to fix it (one line, like bad input)."""


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _home() -> Path:
    """The local chatforge home (the store's default root; ~/.cache/chatforge when the store is remote)."""
    from artifacts.store import DEFAULT_ROOT

    home = os.environ.get("CHATFORGE_HOME") or DEFAULT_ROOT
    return Path(DEFAULT_ROOT if "://" in home and not home.startswith("file://") else home.removeprefix("file://")).expanduser()


def server_env() -> dict[str, str]:
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if not any(k in env for k in ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")):
        db = _home() / "prefect" / "prefect.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{db}"
    return env


def start_server(host: str, port: int, api: str, signals: Signals, timeout: float = 180) -> subprocess.Popen | None:
    """Start `prefect server start` unless one already answers there; wait until it is healthy."""
    if _healthy(api):
        print(f"chatforge server: using the Prefect server already running at {api}", file=sys.stderr, flush=True)
        return None
    proc = spawn([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], server_env())
    deadline = time.monotonic() + timeout
    while not _healthy(api):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise StartupError(f"the Prefect server on {host}:{port} did not start (is the port taken? try --port)")
        if signals.wait(0.3):
            break
    return proc


def _stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    signal_group(proc.pid, 15)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, 9)
        proc.wait()


# ------------------------------------------------------------------ pools, deployments, automation

def ensure_pools(api: str) -> None:
    """Create the process work pools that do not exist (a pool a user changed in the UI is left as it is)."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    for name, what in POOLS.items():
        r = request("POST", f"{api}/work_pools/", json={
            "name": name, "type": "process", "base_job_template": template,
            "description": f"chatforge: {what}. Start a worker with `chatforge worker --pool {name}`."})
        if r.status_code not in (201, 409):  # 409: it exists
            raise StartupError(f"could not create the work pool {name!r}: {r.status_code} {r.text[:200]}")


def deploy(api: str, log: Path) -> subprocess.Popen:
    """`prefect deploy --all` in deploy/, exactly as a user runs it there."""
    env = {**os.environ, "PREFECT_API_URL": api}
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=DEPLOY_DIR,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def set_defaults(api: str, config: dict, store: str | None) -> dict[str, dict]:
    """Make the server's preset and --set the defaults of both deployments' forms; returns name → deployment."""
    out = {}
    for name, path in DEPLOYMENTS.items():
        dep = request("GET", f"{api}/deployments/name/{path}").json()
        params = {**dep.get("parameters", {}), "config": config}
        if store:
            params["store"] = store
        r = request("PATCH", f"{api}/deployments/{dep['id']}", json={"parameters": params})
        if r.status_code != 204:
            raise StartupError(f"could not set the defaults of {path}: {r.status_code} {r.text[:300]}")
        out[name] = dep
    return out


def automation(within: float) -> dict:
    """Prefect's zombie-flow recipe (docs: "Detect zombie flows"), limited to runs of chatforge's pools: after
    each heartbeat expect another one or a final state within `within` seconds, else mark the run Crashed."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=AUTOMATION,
        description=f"Flow runs on the chatforge pools send a heartbeat every {HEARTBEAT_SECONDS} s; one silent for "
                    f"{within:.0f} s lost its worker or machine. Installed by `chatforge server`.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Only runs a chatforge worker started: their heartbeat frequency is set (deploy/prefect.yaml);
            # another deployment on this server may beat every 180 s (Prefect's default) and must not crash.
            match_related=ResourceSpecification({"prefect.resource.role": "work-pool", "prefect.resource.name": list(POOLS)}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {within:.0f} s: its worker or machine stopped. Retry resumes it.")],
    ).model_dump(mode="json", exclude={"id", "created", "updated"}, exclude_none=False)


def install_automation(api: str, within: float) -> str:
    """Create the automation, or update the one an earlier start created (one, with today's window)."""
    body = automation(within)
    body.pop("owner_resource", None)  # not a field of the update; None on create anyway
    r = request("POST", f"{api}/automations/filter", json={"automations": {"name": {"any_": [AUTOMATION]}}})
    existing = [a for a in r.json() if a["name"] == AUTOMATION] if r.status_code == 200 else []
    for extra in existing[1:]:
        request("DELETE", f"{api}/automations/{extra['id']}")
    if existing:
        r = request("PUT", f"{api}/automations/{existing[0]['id']}", json=body)
        ok, aid = r.status_code == 204, existing[0]["id"]
    else:
        r = request("POST", f"{api}/automations/", json=body)
        ok, aid = r.status_code == 201, (r.json() or {}).get("id") if r.status_code == 201 else None
    if not ok:
        raise StartupError(f"could not install the heartbeat automation: {r.status_code} {r.text[:300]}")
    return aid


def online(api: str, pool: str, name: str) -> bool:
    """Whether the worker `name` has reported to the API (a worker is ONLINE from its first heartbeat)."""
    try:
        r = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=5)
        return r.status_code == 200 and any(w["name"] == name and w.get("status") == "ONLINE" for w in r.json())
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------ the local workers

class LocalWorker:
    """A `chatforge worker --pool POOL` child, started again when it dies on its own."""

    def __init__(self, pool: str, api: str, store: str | None):
        self.pool = pool
        self.cmd = [sys.executable, "-m", "flows.cli", "worker", "--pool", pool] + (["--store", store] if store else [])
        self.env = {**os.environ, "PREFECT_API_URL": api}
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.proc = spawn(self.cmd, self.env)

    @property
    def name(self) -> str:
        """The name `chatforge worker` gives its Prefect worker (flows.worker.Worker)."""
        return f"{self.pool}@{socket.gethostname()}-{self.proc.pid}"

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        if self.restarts >= RESTARTS:
            if self.restarts == RESTARTS:
                self.restarts += 1
                print(f"chatforge server: the {self.pool} worker keeps exiting ({self.proc.returncode}); not starting it "
                      f"again: see its error above", file=sys.stderr, flush=True)
            return
        self.restarts += 1
        print(f"chatforge server: the {self.pool} worker exited ({self.proc.returncode}); starting it again "
              f"({self.restarts}/{RESTARTS})", file=sys.stderr, flush=True)
        self.start()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # `chatforge worker` cancels its runs, then stops its Prefect worker

    def kill(self) -> None:
        if self.proc is not None:
            signal_group(self.proc.pid, 2)  # its second signal: it kills its runs' process groups and exits
            if self.proc.poll() is None:
                self.proc.send_signal(2)


def stop_all(workers: list[LocalWorker], server: subprocess.Popen | None, signals: Signals, timeout: float = 120) -> None:
    """Workers first (each cancels its runs: checkpoints, Cancelled), then the Prefect server they report to."""
    for w in workers:
        w.terminate()
    count, deadline = signals.count, time.monotonic() + timeout
    while any(w.proc and w.proc.poll() is None for w in workers) and time.monotonic() < deadline:
        if signals.count != count:  # a second Ctrl-C: stop waiting for checkpoints
            for w in workers:
                w.kill()
            count = signals.count
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.2)
    for w in workers:
        if w.proc is not None and w.proc.poll() is None:
            signal_group(w.proc.pid, 9)
            w.proc.wait()
    _stop(server)


def _import_prefect() -> None:
    import prefect.automations  # noqa: F401
    import prefect.workers.process  # noqa: F401


def _banner(host: str, local: str, port: int, deps: dict[str, dict], preset: str, local_pools: list[str]) -> str:
    ui = f"http://{local}:{port}"
    pipe, stage = deps["chatforge-pipeline"]["id"], deps["chatforge-stage"]["id"]
    here = f"a worker for {' and '.join(local_pools)} here" if local_pools else "no worker here"
    if host in ("127.0.0.1", "localhost", "::1"):
        remote = "for workers on other machines, restart with --host 0.0.0.0"
    else:
        remote = f"other machines: PREFECT_API_URL=http://THIS-HOST:{port}/api chatforge worker --pool chatforge-gpu --store URL"
    return "\n".join([
        f"chatforge server: Prefect UI at {ui}",
        f"  run the pipeline:  {ui}/deployments/deployment/{pipe}  → Run → Quick run ({preset}) or Custom run (edit the config)",
        f"  rerun one stage:   {ui}/deployments/deployment/{stage}  → Run → Custom run, choose the stage",
        f"  a failed run:      {ui}/runs → open it → Retry (finished stages come back Cached, training resumes)",
        f"  workers:           {here}; {remote}",
        "  Ctrl-C stops the workers (their runs checkpoint and end Cancelled), then the server",
    ])


def main(host: str, port: int, preset: str, sets: list[str], store: str | None, prices: str | None = None, crash_after: float = 90,
         local_pools: list[str] | None = None) -> int:
    from flows.overrides import build_config, with_prices
    from flows.ui import form_config

    config = form_config(with_prices(build_config(preset, sets), prices))  # a bad --set or price file fails before anything starts
    if store:
        from artifacts.store import Store

        Store(store).ensure_writable()
    local_pools = list(POOLS) if local_pools is None else local_pools
    if unknown := [p for p in local_pools if p not in POOLS]:
        raise InputError(f"--workers {','.join(unknown)}: not a chatforge pool; use {' and/or '.join(POOLS)} (comma-separated), or none")
    if crash_after <= HEARTBEAT_SECONDS:
        raise InputError(f"--crash-after {crash_after:g} is not longer than the {HEARTBEAT_SECONDS} s between heartbeats: "
                         f"every run would be marked Crashed; use at least {HEARTBEAT_SECONDS + 10}")
    t0 = time.monotonic()
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is reached here on loopback
    api = f"http://{local}:{port}/api"
    os.environ["PREFECT_API_URL"] = api
    signals = Signals()
    preload = threading.Thread(target=_import_prefect, daemon=True)
    preload.start()  # Prefect's import (seconds) overlaps the server's start-up
    server = start_server(host, port, api, signals)
    phases = {"Prefect server": time.monotonic() - t0}
    workers: list[LocalWorker] = []
    try:
        if signals.count:
            return 130
        preload.join()
        ensure_pools(api)
        log = _home() / "prefect" / "deploy.log"
        deploying = deploy(api, log)
        workers = [LocalWorker(pool, api, store) for pool in local_pools]
        for w in workers:
            w.start()
        while deploying.poll() is None:
            if signals.wait(0.2):
                deploying.kill()
                return 130
        if deploying.returncode != 0:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            raise StartupError(f"`prefect deploy --all` in {DEPLOY_DIR} failed ({tail}); full log: {log}")
        phases["deployments"] = time.monotonic() - t0
        deps = set_defaults(api, config, store)
        install_automation(api, crash_after)
        print(_banner(host, local, port, deps, preset, local_pools), file=sys.stderr, flush=True)
        while not signals.wait(0.5) and not all(online(api, w.pool, w.name) for w in workers):
            if any(w.proc.poll() is not None for w in workers):
                raise StartupError("a local worker exited during start-up (see its error above)")
        if not signals.count:
            took = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
            print(f"chatforge server: ready in {time.monotonic() - t0:.1f} s: {len(workers)} local worker(s) online "
                  f"(after start: {took})", file=sys.stderr, flush=True)
        while not signals.wait(1.0):
            if server is not None and server.poll() is not None:
                raise StartupError(f"the Prefect server exited with status {server.returncode}")
            for w in workers:
                w.check()
        why = "Ctrl-C" if signals.first == 2 else "SIGTERM"
        print(f"chatforge server: {why}: stopping the workers (in-flight runs checkpoint and end Cancelled), "
              "then the server; again to kill", file=sys.stderr, flush=True)
        return 0
    finally:
        stop_all(workers, server, signals)
        left = [w.pool for w in workers if w.proc is not None and group_alive(w.proc.pid)]
        print("chatforge server: stopped" + (f" (still exiting: {', '.join(left)})" if left else ""), file=sys.stderr, flush=True)
