"""`chatforge worker`: a Prefect worker for one of chatforge's work pools, on this machine or another one.

It checks what a user can get wrong before anything runs (the API, the pool, the store), then supervises one
`prefect worker start --pool POOL` child. Stopping it (Ctrl-C, SIGTERM, or its parent `chatforge server`
dying) stops what it started in order: its in-flight flow runs are set Cancelling through the API and their
process groups get SIGTERM, as Prefect's own cancellation does (a training stage writes a checkpoint and
exits); once they are gone the runs are recorded Cancelled and the Prefect worker exits. A second signal, or a
run that outlives the grace period, is killed and marked Crashed.

Also here: the pull step of deploy/prefect.yaml, and the process helpers `chatforge server` shares.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

POOLS = {
    "chatforge-cpu": "data, tokenizer, eval sets, evals, report: any machine",
    "chatforge-gpu": "training stages (base, mid, sft, rl): GPU machines",
}
LOCAL_API = "http://127.0.0.1:4200/api"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STOP_TIMEOUT = 90.0  # Prefect gives a cancelled run 30 s between SIGTERM and SIGKILL; the rest is start-up slack


# ------------------------------------------------------------------ the deployments' pull step

def checkout() -> Path | None:
    """The chatforge checkout this interpreter imports `flows` from (an editable install), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "flows").is_dir() else None


def enter_checkout() -> dict[str, str]:
    """Pull step of deploy/prefect.yaml: start the flow run in this machine's checkout (the directory
    `chatforge run` runs from), found on the worker's machine at run time, so no path of the machine that
    deployed is baked into the deployment. Without a checkout (a wheel install) the run stays where the
    worker started it."""
    root = checkout()
    if root is not None:
        os.chdir(root)
    return {"directory": os.getcwd()}


# ------------------------------------------------------------------ processes

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child between fork and exec only calls it
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux), so a killed
    `chatforge server` or `chatforge worker` does not leave a Prefect server or worker behind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(cmd: list[str], env: dict[str, str], stdout=None) -> subprocess.Popen:
    """A child in its own session (a terminal's Ctrl-C reaches only us: we stop children in order) that dies
    with us."""
    return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                            start_new_session=True, preexec_fn=_die_with_parent)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name in () may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def groups_of(pids: list[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            out.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return out


class Signals:
    """SIGINT/SIGTERM counted, not raised: the first starts an orderly stop, the second makes it a kill."""

    def __init__(self):
        self.count = 0
        self.first: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, sig, frame) -> None:
        self.count += 1
        self.first = self.first or sig

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True when a signal came (at once)."""
        deadline = time.monotonic() + seconds
        while not self.count and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return bool(self.count)


# ------------------------------------------------------------------ the Prefect API (plain HTTP: no Prefect import)

def request(method: str, url: str, patience: float = 30, **kw):
    """One API call, tried again while the server answers 503 (its SQLite database is busy: a fresh server on a
    loaded machine) or is briefly unreachable, for up to `patience` seconds; the last answer or error stands."""
    import httpx

    deadline, timeout = time.monotonic() + patience, kw.pop("timeout", 10)
    while True:
        try:
            r = httpx.request(method, url, timeout=timeout, **kw)
            if r.status_code not in (429, 503) or time.monotonic() > deadline:
                return r
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def api_url() -> str:
    """PREFECT_API_URL, else a server on this machine's default port (what `chatforge server` starts)."""
    return os.environ.get("PREFECT_API_URL") or LOCAL_API


def check_api(api: str) -> None:
    import httpx

    from model.errors import InputError

    try:
        ok = httpx.get(f"{api}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        ok = False
    if not ok:
        raise InputError(f"no Prefect API answers at {api}: start `chatforge server` (on the machine that runs it, "
                         "with --host 0.0.0.0 for other machines) and set PREFECT_API_URL=http://HOST:PORT/api here")


def work_pools(api: str) -> list[str]:
    r = request("POST", f"{api}/work_pools/filter", json={})
    r.raise_for_status()
    return sorted(p["name"] for p in r.json())


def check_pool(api: str, pool: str) -> None:
    from model.errors import InputError

    pools = work_pools(api)
    if pool not in pools:
        known = ", ".join(pools) or "none"
        raise InputError(f"no work pool {pool!r} at {api} (it has: {known}): use --pool chatforge-cpu or --pool chatforge-gpu, "
                         "which `chatforge server` creates")


def _set_state(api: str, run_id: str, state: str, message: str, force: bool = False) -> None:
    import httpx

    try:
        request("POST", f"{api}/flow_runs/{run_id}/set_state", patience=10,
                json={"state": {"type": state, "message": message}, "force": force})
    except httpx.HTTPError:
        pass  # the API is gone: the heartbeat automation marks the run Crashed when it is back


def _runs(api: str, pool: str, types: list[str]) -> list[dict]:
    import httpx

    try:
        r = request("POST", f"{api}/flow_runs/filter", patience=10, json={
            "flow_runs": {"state": {"type": {"any_": types}}}, "work_pools": {"name": {"any_": [pool]}}})
        return r.json() if r.status_code == 200 else []
    except httpx.HTTPError:
        return []


def _infra_pid(run: dict) -> int | None:
    pid = str(run.get("infrastructure_pid") or "").rsplit(":", 1)[-1]  # "pid" or "host:pid"
    return int(pid) if pid.isdigit() else None


# ------------------------------------------------------------------ the worker

class Worker:
    """One `prefect worker start --pool POOL` child, and how to stop it and the flow runs it started."""

    def __init__(self, pool: str, api: str, env: dict[str, str], name: str | None = None, limit: int | None = None):
        self.pool, self.api, self.env = pool, api, env
        self.name = name or f"{pool}@{socket.gethostname()}-{os.getpid()}"
        self.cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", self.name]
        if limit:
            self.cmd += ["--limit", str(limit)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = spawn(self.cmd, self.env)

    def flow_run_groups(self) -> set[int]:
        """The process groups of the flow runs this worker started (Prefect gives each its own session)."""
        if self.proc is None:
            return set()
        return groups_of(descendants(self.proc.pid)) - {os.getpgid(0), self.proc.pid}

    def in_flight(self) -> list[dict]:
        """Flow runs of this pool whose process is one of ours (another machine's are not ours to stop)."""
        mine = set(descendants(self.proc.pid)) if self.proc else set()
        return [r for r in _runs(self.api, self.pool, ["PENDING", "RUNNING", "CANCELLING"]) if _infra_pid(r) in mine]

    def stop(self, signals: Signals, reason: str, timeout: float = STOP_TIMEOUT) -> None:
        """Stop taking runs; cancel the runs in flight and SIGTERM their process groups (what Prefect's own
        cancellation does: a training stage writes a checkpoint and exits); once their processes are gone, record
        them Cancelled. What is still alive after `timeout` or a second signal is killed, its run Crashed.

        The signals are sent here rather than left to the Prefect worker: once stopping, it does not always act
        on a cancel (3.9), and a run left Cancelling could not be retried."""
        if self.proc is None:
            return
        runs, groups = self.in_flight(), self.flow_run_groups()  # first: they are found as the worker's descendants
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # stop polling for new runs
        ids = {r["id"] for r in runs}
        for run_id in ids:
            _set_state(self.api, run_id, "CANCELLING", reason)
        for pgid in groups:
            signal_group(pgid, signal.SIGTERM)
        count, deadline = signals.count, time.monotonic() + timeout
        while time.monotonic() < deadline and signals.count == count:
            groups |= self.flow_run_groups()
            if not any(group_alive(g) for g in groups):
                break
            time.sleep(0.2)
        killed = [g for g in groups if group_alive(g)]
        for pgid in killed:
            signal_group(pgid, signal.SIGKILL)
        for run_id, state in (_unfinished(self.api, ids) or {}).items():
            if state == "CANCELLING" and not killed:  # ended on the cancel's SIGTERM, as a cancelled run does
                _set_state(self.api, run_id, "CANCELLED", reason, force=True)
            else:
                _set_state(self.api, run_id, "CRASHED", f"{reason}; its process was killed", force=True)
        try:  # with no run left, Prefect's worker has nothing to finish: a moment to exit, then it is killed
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _unfinished(api: str, ids: set[str]) -> dict[str, str]:
    """run id → state type of those of `ids` not in a final state ({} too when the API is gone)."""
    import httpx

    if not ids:
        return {}
    try:
        r = request("POST", f"{api}/flow_runs/filter", patience=10, json={"flow_runs": {"id": {"any_": sorted(ids)}}})
        runs = r.json() if r.status_code == 200 else []
    except httpx.HTTPError:
        return {}
    return {r["id"]: r["state"]["type"] for r in runs if r.get("state") and r["state"]["type"] not in FINAL}


def worker_env(api: str, store: str | None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": api}
    if store:
        env["CHATFORGE_HOME"] = store  # runs whose `store` field is empty use it (tasks read CHATFORGE_HOME)
    # Prefect's default is 10 s between polls: a run clicked in the UI would wait that long to start.
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "3")
    # Also set per deployment (deploy/prefect.yaml); here for runs of deployments made some other way.
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    return env


def main(pool: str, store: str | None, name: str | None = None, limit: int | None = None) -> int:
    from artifacts.store import Store

    signals = Signals()
    api = api_url()
    check_api(api)
    check_pool(api, pool)
    st = Store(store)
    st.ensure_writable()  # a store this machine cannot write: one line now, not a failed run later
    worker = Worker(pool, api, worker_env(api, store), name=name, limit=limit)
    worker.start()
    print(f"chatforge worker: {worker.name} polls {pool} ({POOLS.get(pool, 'a custom pool')}) at {api}; runs with "
          f"an empty `store` field use {st.url}. Ctrl-C stops it (its runs are cancelled; training checkpoints first)",
          file=sys.stderr, flush=True)
    while not signals.wait(1.0):
        if worker.proc.poll() is not None:
            print(f"chatforge worker: the Prefect worker exited with status {worker.proc.returncode}", file=sys.stderr)
            return 1
    why = "Ctrl-C" if signals.first == signal.SIGINT else "SIGTERM"
    print(f"chatforge worker: {why}: cancelling this worker's runs and stopping it (again to kill)", file=sys.stderr, flush=True)
    worker.stop(signals, f"chatforge worker on {socket.gethostname()} stopped ({why})")
    return 0
