"""tasks/launch.py: a stage's child process and everything it starts stop on a timeout, never outlive the process
that launched them, rendezvous on a fresh port each attempt, and count as finished only with their metrics and
artifact files."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model.errors import InputError
from tasks.launch import StageTimeout, command, launch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc as on Linux")

# A stand-in entry point: what it does is in its spec. It and its grandchild ignore SIGTERM when asked to, so the
# SIGKILL after the grace period is what must end them.
CHILD = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    from pathlib import Path

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    mode = spec["mode"]
    if mode == "finish":
        for name in spec.get("files", []):
            (out / name).write_text("x")
        metrics = {"rank": int(os.environ.get("RANK", 0)), "world": int(os.environ.get("WORLD_SIZE", 1)),
                   "master_addr": os.environ.get("MASTER_ADDR")}
        (out / f"rank{metrics['rank']}").write_text("ran")
        if metrics["rank"] == 0:
            Path(spec["metrics_path"]).write_text(json.dumps(metrics))
            print(json.dumps(metrics))  # what runtime.main prints last: kept out of the log
        print("done", flush=True)
    elif mode == "exit0":
        print("stopping early, metrics unwritten", flush=True)
    elif mode == "hang":
        if spec.get("ignore_term"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"open({str(out / 'grandchild.pid')!r}, 'w').write(str(os.getpid())); time.sleep(600)")
        subprocess.Popen([sys.executable, "-c", code])
        (out / "child.pid").write_text(str(os.getpid()))
        print("hanging", flush=True)
        time.sleep(600)
    elif mode == "checkpoint_on_term":
        def term(*_):
            (out / "checkpointed").write_text("yes")
            sys.exit(143)
        signal.signal(signal.SIGTERM, term)
        (out / "child.pid").write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)
""")


@pytest.fixture
def child(tmp_path, monkeypatch) -> str:
    """The module name of CHILD, importable by the processes launch() starts."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "fake_stage.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "mods"), str(ROOT)]))
    return "fake_stage"


def gone(pid: int, timeout: float = 10) -> bool:
    """Whether `pid` has exited (a zombie waiting for init to reap it counts as exited)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def wait_for_file(path: Path, timeout: float = 20) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")



def test_a_finished_child_returns_its_metrics_and_its_json_line_stays_out_of_the_log(child, tmp_path):
    logged: list[str] = []
    spec = {"mode": "finish", "out_dir": str(tmp_path / "out"), "files": ["model.safetensors", "model.json"]}
    metrics = launch(child, spec, tmp_path / "work", log=logged.append, expect=("model.safetensors", "model.json"))
    assert metrics == {"rank": 0, "world": 1, "master_addr": None}
    assert logged == ["done"]  # the metrics JSON the child printed is not forwarded


def test_a_child_that_exits_0_without_metrics_or_its_artifact_failed(child, tmp_path):
    with pytest.raises(RuntimeError, match=r"fake_stage exited 0 but wrote no metrics .*stopping early, metrics unwritten"):
        launch(child, {"mode": "exit0", "out_dir": str(tmp_path / "out")}, tmp_path / "work", log=lambda m: None)
    spec = {"mode": "finish", "out_dir": str(tmp_path / "out"), "files": ["model.json"]}
    with pytest.raises(RuntimeError, match=r"exited 0 but its artifact lacks model\.safetensors"):
        launch(child, spec, tmp_path / "work", log=lambda m: None, expect=("model.safetensors", "model.json"))
    # a metrics file left by an earlier attempt does not make a later one count as finished
    (tmp_path / "work" / "metrics.json").write_text('{"stale": true}')
    with pytest.raises(RuntimeError, match="wrote no metrics"):
        launch(child, {"mode": "exit0", "out_dir": str(tmp_path / "out")}, tmp_path / "work", log=lambda m: None)


def test_a_timeout_kills_the_whole_process_group_even_what_ignores_sigterm(child, tmp_path):
    out = tmp_path / "out"
    spec = {"mode": "hang", "ignore_term": True, "out_dir": str(out)}
    t0 = time.monotonic()
    with pytest.raises(StageTimeout) as e:
        launch(child, spec, tmp_path / "work", log=lambda m: None, timeout_minutes=0.05, limit_name="base.timeout_minutes",
               grace=1.0)
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert isinstance(e.value, InputError) and "\n" not in msg  # the CLI prints it as one line
    assert "0.05-minute limit (base.timeout_minutes)" in msg and "raise base.timeout_minutes" in msg
    child_pid, grandchild_pid = int((out / "child.pid").read_text()), int(wait_for_file(out / "grandchild.pid"))
    assert gone(child_pid) and gone(grandchild_pid)  # SIGTERM was ignored: SIGKILL after the grace period ended both
    assert 3.0 + 1.0 <= elapsed < 3.0 + 1.0 + 15


def test_a_leaked_grandchild_does_not_hang_the_stage_after_its_parent_exits(child, tmp_path):
    """The child exits (here: killed) while its grandchild still holds the output pipe: launch returns anyway."""
    out = tmp_path / "out"
    import threading

    def kill_child():  # once the grandchild runs
        wait_for_file(out / "grandchild.pid")
        os.kill(int(wait_for_file(out / "child.pid")), signal.SIGKILL)

    threading.Thread(target=kill_child, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with status -9"):
        launch(child, {"mode": "hang", "out_dir": str(out)}, tmp_path / "work", log=lambda m: None)
    assert time.monotonic() - t0 < 30
    assert gone(int(wait_for_file(out / "grandchild.pid")))


def test_the_child_stops_and_checkpoints_when_the_launching_process_dies(child, tmp_path):
    """A killed worker (SIGKILL: no handler runs) must not leave its training process running on, orphaned."""
    out = tmp_path / "out"
    worker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from tasks.launch import launch
        launch({child!r}, {{"mode": "checkpoint_on_term", "out_dir": {str(out)!r}}}, Path({str(tmp_path / 'work')!r}))
    """)], cwd=ROOT)
    try:
        pid = int(wait_for_file(out / "child.pid"))
        worker.kill()
        worker.wait(timeout=10)
        assert gone(pid), "the child outlived the process that launched it"
        assert (out / "checkpointed").read_text() == "yes"  # it got SIGTERM, so a trainer writes its checkpoint
    finally:
        worker.kill()
        if (out / "child.pid").exists():  # a failed run of this test must not leave its orphan behind either
            try:
                os.kill(int((out / "child.pid").read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_torchrun_rendezvous_on_a_fresh_free_port_each_attempt(tmp_path):
    cmds = [command("model.train.base", tmp_path / "spec.json", 4) for _ in range(3)]
    endpoints = [next(a.split("=", 1)[1] for a in c if a.startswith("--rdzv-endpoint=")) for c in cmds]
    ids = [next(a for a in c if a.startswith("--rdzv-id=")) for c in cmds]
    assert all(e.startswith("127.0.0.1:") for e in endpoints)
    assert len(set(endpoints)) == 3 and len(set(ids)) == 3  # a killed attempt's port or id is never reused
    assert "--standalone" not in cmds[0] and "--nproc-per-node=4" in cmds[0]
    assert cmds[0][-2:] == ["model.train.base", str(tmp_path / "spec.json")]
    for e in endpoints:  # free when picked: a listener can bind it
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(e.rsplit(":", 1)[1])))
    assert command("model.train.base", tmp_path / "spec.json", 1)[1:] == ["-m", "model.train.base", str(tmp_path / "spec.json")]


@pytest.mark.slow
def test_two_processes_rendezvous_on_127_0_0_1(child, tmp_path):
    logged: list[str] = []
    spec = {"mode": "finish", "out_dir": str(tmp_path / "out")}
    metrics = launch(child, spec, tmp_path / "work", nproc=2, log=logged.append)
    assert metrics == {"rank": 0, "world": 2, "master_addr": "127.0.0.1"}
    assert (tmp_path / "out" / "rank1").read_text() == "ran"
    assert any(line.startswith("torchrun: 2 processes, rendezvous at 127.0.0.1:") for line in logged)
    assert not any(line.startswith("{") for line in logged)
