"""`chatforge server` as a user runs it: a real Prefect server (UI on), the two work pools with a real
`chatforge worker` each, the deployments applied from deploy/prefect.yaml by `prefect deploy --all`, and
the heartbeat automation. Runs are triggered through the REST API the way the UI's buttons do it.

One server for the module (its start-up is most of the cost); the last test stops it with Ctrl-C.
Heartbeats come every 30 s (Prefect's minimum), and the server marks a run Crashed after 40 s without one.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import RetryingClient, free_port, sets_for, write_corpus

HTTP = RetryingClient()  # the server under test answers 503 for a moment when its SQLite database is busy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CRASH_AFTER = 40
CHROMIUM = Path("/usr/bin/chromium")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# base long enough to be caught after its first checkpoint, short enough to finish quickly once resumed
SLOW_BASE = ["base.num_iterations=12", "base.checkpoint_every=4", "base.eval_every=12", "base.sample_every=12"]
# base that runs until stopped; no periodic checkpoint, so any checkpoint is the one SIGTERM asked for
LONG_BASE = ["base.num_iterations=400", "base.checkpoint_every=1000", "base.eval_every=400", "base.sample_every=400"]


def _wait(fn, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log else ""))


def _tree(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of `pid` and every process below it: a pid reused later does not count as alive."""
    from flows.worker import descendants

    out = []
    for p in [pid, *descendants(pid)]:
        try:
            out.append((p, Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[19]))
        except OSError:
            pass
    return out


def _alive(tree: list[tuple[int, str]]) -> list[str]:
    out = []
    for pid, start in tree:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[19] == start and stat[0] != "Z":
            out.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120])
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


@dataclass
class Server:
    proc: subprocess.Popen
    api: str
    ui: str
    store: Path
    home: Path
    log: Path
    sets: list[str]
    started_in: float

    def deployment(self, name: str) -> dict:
        return HTTP.get(f"{self.api}/deployments/name/{name}", timeout=10).json()

    def trigger(self, name: str, parameters: dict) -> dict:
        dep = self.deployment(name)
        r = HTTP.post(f"{self.api}/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters}, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()

    def run(self, run_id: str) -> dict:
        return HTTP.get(f"{self.api}/flow_runs/{run_id}", timeout=10).json()

    def wait_final(self, run_id: str, timeout: float) -> dict:
        return _wait(lambda: (r := self.run(run_id))["state"]["type"] in FINAL and r, timeout, f"flow run {run_id}", self.log)

    def tasks(self, run_id: str) -> dict[str, str]:
        """stage → state name of the run's task runs (the newest attempt of each)."""
        runs = HTTP.post(f"{self.api}/task_runs/filter", timeout=10, json={
            "flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()
        return {t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in runs}

    def config(self, *extra: str) -> dict:
        from flows.overrides import build_config

        return build_config("tiny", [*self.sets, *extra]).model_dump(mode="json")

    def worker_pid(self, pool: str) -> int:
        from flows.worker import descendants

        return next(p for p in descendants(self.proc.pid) if f"flows.cli worker --pool {pool}" in _cmdline(p))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    corpus = write_corpus(tmp / "docs.jsonl", docs=800)
    args = sets_for(corpus, vocab=600)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp / "prefect"), CHATFORGE_HOME=str(tmp / "home"), PREFECT_UI_ENABLED="true",
               PREFECT_WORKER_QUERY_SECONDS="1", PYTHONUNBUFFERED="1")
    log = tmp / "server.log"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "server", "--port", str(port), "--store", str(tmp / "store"),
                             "--crash-after", str(CRASH_AFTER), *args], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    s = Server(proc, f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}", tmp / "store", tmp / "home", log,
               [a for a in args if a != "--set"], 0.0)
    try:
        _wait(lambda: "chatforge server: ready in" in log.read_text() or proc.poll() is not None, 300, "the server", log)
        assert proc.poll() is None, log.read_text()[-4000:]
        s.started_in = time.time() - t0
        yield s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_server_creates_pools_deployments_and_the_heartbeat_automation(server):
    """What `chatforge server` set up, read back from the API: process pools, one online worker each, the
    deployments of deploy/prefect.yaml with the server's --set as their defaults, one automation."""
    print(f"\nchatforge server start-up: {server.started_in:.1f} s to both workers online")
    pools = {p["name"]: p for p in HTTP.post(f"{server.api}/work_pools/filter", json={}, timeout=10).json()}
    assert pools["chatforge-cpu"]["type"] == pools["chatforge-gpu"]["type"] == "process"
    for name, (entrypoint, pool) in {"chatforge/chatforge-pipeline": ("flows.pipeline:pipeline", "chatforge-cpu"),
                                     "chatforge-stage/chatforge-stage": ("flows.pipeline:stage_flow", "chatforge-gpu")}.items():
        dep = server.deployment(name)
        assert (dep["entrypoint"], dep["work_pool_name"]) == (entrypoint, pool)
        assert dep["pull_steps"] == [{"flows.worker.enter_checkout": {}}]
        assert dep["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        assert dep["parameters"]["config"]["tokenizer"]["vocab_size"] == 600 and dep["parameters"]["store"] == str(server.store)
    workers = {p: HTTP.post(f"{server.api}/work_pools/{p}/workers/filter", json={}, timeout=10).json() for p in pools}
    assert all(any(w["status"] == "ONLINE" for w in ws) for ws in workers.values()), workers
    autos = [a for a in HTTP.post(f"{server.api}/automations/filter", json={}, timeout=10).json() if a["name"].startswith("chatforge")]
    assert len(autos) == 1 and autos[0]["trigger"]["within"] == CRASH_AFTER and autos[0]["trigger"]["posture"] == "Proactive"
    assert autos[0]["actions"] == [autos[0]["actions"][0]] and autos[0]["actions"][0]["state"] == "CRASHED"
    from flows.server import install_automation

    assert install_automation(server.api, CRASH_AFTER) == autos[0]["id"]  # a restart updates it: still one
    assert len([a for a in HTTP.post(f"{server.api}/automations/filter", json={}, timeout=10).json() if a["name"].startswith("chatforge")]) == 1


def test_a_run_whose_worker_dies_is_crashed_by_heartbeat_and_retry_resumes_it(server, tmp_path):
    """The machine under a run dies (SIGKILL of the worker's whole tree, mid-`base`): within the heartbeat
    window the automation marks the run Crashed; `chatforge server` has started the worker again; the UI's
    Retry reruns it: data and tokenizer Cached, base resumed from its checkpoint, the run Completed.
    While the dead run waits for its window: a `chatforge-stage` run on the GPU pool's worker, a worker with
    bad input, and the screenshot of the deployment's form."""
    config = server.config(*SLOW_BASE)
    t0 = time.time()
    run = server.trigger("chatforge/chatforge-pipeline", {"config": config, "until": "base"})
    _wait(lambda: any((server.store / "wip").glob("*/step-00000004")), 240, "base's first checkpoint", server.log)
    assert server.run(run["id"])["state"]["type"] == "RUNNING"
    worker = server.worker_pid("chatforge-cpu")
    tree = _tree(worker)
    assert any("prefect.engine" in _cmdline(p) or "_workspace_supervisor" in _cmdline(p) for p, _ in tree), tree
    from flows.worker import groups_of

    for pgid in groups_of([p for p, _ in tree]):
        os.killpg(pgid, signal.SIGKILL)
    killed = time.time()
    _wait(lambda: not _alive(tree), 10, "the killed worker's processes to be gone")

    # meanwhile: one stage through the single-stage deployment, on the GPU pool's worker (tokenizer: cached)
    stage = server.trigger("chatforge-stage/chatforge-stage", {"stage": "tokenizer", "config": config})
    bad = _bad_worker_input(server, tmp_path)
    shot = _screenshot_form(server, server.deployment("chatforge/chatforge-pipeline")["id"])
    stage = server.wait_final(stage["id"], 120)
    assert stage["state"]["type"] == "COMPLETED" and stage["work_pool_name"] == "chatforge-gpu", stage["state"]
    assert server.tasks(stage["id"]) == {"tokenizer": "Cached"}
    assert bad == [1, 1]

    crashed = server.wait_final(run["id"], CRASH_AFTER + 45)
    print(f"\nworker killed → run Crashed in {time.time() - killed:.1f} s (window {CRASH_AFTER} s); form: {shot}")
    assert crashed["state"]["type"] == "CRASHED" and "heartbeat" in crashed["state"]["message"], crashed["state"]
    # the UI's Retry button (prefect-ui-library's retryFlowRun)
    r = HTTP.post(f"{server.api}/flow_runs/{run['id']}/set_state", timeout=10, json={
        "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": False})
    assert r.json()["status"] == "ACCEPT", r.text
    done = server.wait_final(run["id"], 240)
    assert done["state"]["type"] == "COMPLETED", server.log.read_text()[-4000:]
    assert done["run_count"] >= 2
    assert server.tasks(run["id"]) == {"data": "Cached", "tokenizer": "Cached", "base": "Completed"}
    from artifacts.store import Store

    st = Store(str(server.store))
    base = st.get(st.resolve("base/latest"))
    assert base.metrics["resumed_from"] and base.metrics["resumed_from"][0] >= 4, base.metrics["resumed_from"]
    print(f"trigger → killed → Crashed → retried → Completed: {time.time() - t0:.1f} s")
    _screenshot_run(server, run["id"])


def _bad_worker_input(server: Server, tmp_path: Path) -> list[int]:
    """`chatforge worker` with an unknown pool, and with a store it cannot write: one line each, nothing started."""
    env = {**os.environ, "PREFECT_API_URL": server.api}
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's directory would go")
    cmds = [[sys.executable, "-m", "flows.cli", "worker", "--pool", "chatforge-gpuu"],
            [sys.executable, "-m", "flows.cli", "worker", "--pool", "chatforge-gpu", "--store", str(blocked / "store")]]
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate(timeout=120) for p in procs]
    (_, unknown), (_, unwritable) = outs
    assert unknown.strip().count("\n") == 0 and unknown.startswith("chatforge: error: no work pool 'chatforge-gpuu'"), unknown
    assert "chatforge-cpu, chatforge-gpu" in unknown
    assert unwritable.strip().count("\n") == 0 and unwritable.startswith("chatforge: error:") and "store" in unwritable, unwritable
    return [p.returncode for p in procs]


def _browser():
    if not CHROMIUM.exists():
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


def _screenshot_form(server: Server, deployment_id: str) -> str:
    """The deployment's Custom run page: the parameter form (the config tree), kept in test-artifacts/."""
    sync_playwright = _browser()
    if sync_playwright is None:
        return "skipped (no playwright or /usr/bin/chromium)"
    out = ROOT / "test-artifacts" / "prefect_deployment_form.png"
    out.parent.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = b.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(f"{server.ui}/deployments/deployment/{deployment_id}/run", wait_until="networkidle", timeout=60_000)
        page.get_by_text("tokenizer", exact=False).first.wait_for(timeout=60_000)
        page.screenshot(path=str(out), full_page=False)
        b.close()
    return str(out)


def _screenshot_run(server: Server, run_id: str) -> None:
    """The retried run's page: its stage tree (the graph: data → tokenizer → base), kept in test-artifacts/."""
    sync_playwright = _browser()
    if sync_playwright is None:
        return
    out = ROOT / "test-artifacts" / "prefect_run_graph.png"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox", "--enable-unsafe-swiftshader"])
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server.ui}/runs/flow-run/{run_id}", wait_until="networkidle", timeout=60_000)
        page.get_by_text("Completed").first.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)  # the graph draws on a canvas after the data arrives
        page.screenshot(path=str(out))
        b.close()


def test_ctrl_c_during_base_stops_every_process_and_cancels_the_run(server):
    """Ctrl-C while `base` trains: the run is cancelled (training writes a checkpoint on its SIGTERM first),
    every process the server started is gone within the timeout, the terminal is back (exit 0), and the run's
    final state, read from the server's database, is Cancelled, not Running. Stops the module's server."""
    run = server.trigger("chatforge/chatforge-pipeline", {"config": server.config(*LONG_BASE), "until": "base"})
    _wait(lambda: "base: step 0/400 val bpb" in server.log.read_text(), 240, "base's first evaluation", server.log)
    assert not list((server.store / "wip").glob("*/step-*"))
    tree = _tree(server.proc.pid)
    assert len(tree) >= 8, [_cmdline(p) for p, _ in tree]  # server, Prefect server, 2×(chatforge worker, Prefect worker), engine, training
    t0 = time.time()
    os.killpg(server.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground process group
    rc = server.proc.wait(timeout=120)
    stopped = time.time() - t0
    print(f"\nCtrl-C during base → everything stopped in {stopped:.1f} s")
    assert rc == 0, server.log.read_text()[-3000:]
    _wait(lambda: not _alive(tree), 10, f"every child to exit (left: {_alive(tree)})", server.log)
    db = sqlite3.connect(server.home / "prefect" / "prefect.db")  # the API is gone with the server: its database
    state = db.execute("select state_type, state_name from flow_run where id = ?", (run["id"],)).fetchone()
    logs = [m for (m,) in db.execute("select message from log where flow_run_id = ? order by timestamp", (run["id"],))]
    assert state == ("CANCELLED", "Cancelled"), (state, logs[-5:], server.log.read_text()[-3000:])
    assert len(list((server.store / "wip").glob("*/step-*"))) == 1  # training checkpointed before it ended
