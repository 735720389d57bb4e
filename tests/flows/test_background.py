"""The background Prefect server (flows/background.py), real servers on free ports, each home its own; every
server a test starts is stopped by the `home` fixture, whatever the test did.

A first `chatforge run` with no server starts one and says so in one line; a later run attaches to it; its flow runs
are in that server's API; `chatforge server --stop` stops it. Two starters at once get one server; an idle server
stops itself; with CHATFORGE_BACKGROUND_SERVER=0 nothing is started; a server that cannot start is one error line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port, sets_for, write_corpus

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An environment whose runs may start a background server (on a free port) in a home of their own; the
    server is stopped at the end, and must be gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"CHATFORGE_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "prefect"),
                "CHATFORGE_BACKGROUND_SERVER": "1", "CHATFORGE_SERVER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"})
    for k in [k for k in os.environ if k.startswith("PREFECT_API")]:
        monkeypatch.delenv(k)
    for k in ("CHATFORGE_HOME", "PREFECT_HOME", "CHATFORGE_BACKGROUND_SERVER", "CHATFORGE_SERVER_PORT"):
        monkeypatch.setenv(k, env[k])
    yield env
    from flows import background

    st = background.state()
    if st is not None:
        background.stop()
        assert not alive(st["pid"])


def alive(pid: int, grace: float = 10) -> bool:
    """Whether `pid` still runs `grace` seconds on (a server releases its lock a moment before its process ends)."""
    deadline = time.time() + grace
    while True:
        try:
            running = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            running = False
        if not running or time.time() > deadline:
            return running
        time.sleep(0.1)


def cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI, stderr into stdout; `timeout` also proves that a server it leaves running holds none of its pipes."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT, text=True, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


LINE = re.compile(r"^chatforge: (started a|using the) background Prefect server at (http://127\.0\.0\.1:(\d+)) \(UI\), "
                  r"stops after 30 min idle; stop now: chatforge server --stop$", re.MULTILINE)


def test_first_run_starts_it_later_runs_attach_and_stop_stops_it(home, tmp_path):
    from flows import background

    corpus = write_corpus(tmp_path / "docs.jsonl", docs=300)
    run = ["run", "--store", str(tmp_path / "store"), "--until", "tokenizer", *sets_for(corpus, vocab=512)]
    first = cli(run, home)
    assert first.returncode == 0, first.stdout[-3000:]
    [(verb, ui, port)] = LINE.findall(first.stdout)
    assert verb == "started a" and port == home["CHATFORGE_SERVER_PORT"]
    st = background.state()
    assert st["ui"] == ui and alive(st["pid"], grace=0) and background.healthy(st["url"])
    assert Path(home["CHATFORGE_HOME"], "prefect", "prefect.db").is_file()  # the database `chatforge server` uses

    second = cli(run, home)
    assert second.returncode == 0, second.stdout[-3000:]
    assert LINE.findall(second.stdout) == [("using the", ui, port)] and "Starting temporary server" not in second.stdout
    assert second.stdout.count("Finished in state Cached(") == 2
    assert background.state()["pid"] == st["pid"]
    # both runs are the server's: what the UI shows
    ids = re.findall(r"^── chatforge run ([0-9a-f-]{36}) ", first.stdout + second.stdout, re.MULTILINE)
    runs = httpx.post(f"{st['url']}/flow_runs/filter", json={}, timeout=30).json()
    assert len(ids) == 2 and set(ids) <= {r["id"] for r in runs}

    stop = cli(["server", "--stop"], home, timeout=120)
    assert stop.returncode == 0 and stop.stdout.strip() == f"chatforge server: stopped the background Prefect server at {ui} (pid {st['pid']})"
    assert background.state() is None and not alive(st["pid"]) and not background.healthy(st["url"])
    assert not Path(home["CHATFORGE_HOME"], "prefect", "background.json").exists()
    assert "stopped" in Path(home["CHATFORGE_HOME"], "prefect", "background.log").read_text()
    again = cli(["server", "--stop"], home, timeout=120)
    assert again.returncode == 0 and again.stdout.strip().startswith("chatforge server: no background Prefect server is running for ")


STARTER = "from flows import background; st, started = background.start(); background.wait(st); print(st['pid'], started)"


def test_two_starters_at_once_get_one_server(home):
    from flows import background

    procs = [subprocess.Popen([sys.executable, "-c", STARTER], env=home, cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {pid for pid, _ in outs} == {str(background.state()["pid"])}
    assert sorted(started for _, started in outs) == ["False", "True"]


def test_an_idle_server_stops_itself(home):
    from flows import background

    env = {**home, "CHATFORGE_SERVER_IDLE_MINUTES": "0.1"}
    out = subprocess.run([sys.executable, "-c", STARTER], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    st = background.state()
    assert st["idle_minutes"] == 0.1
    until = time.time() + 20  # requests keep it up, for three times its idle period of 6 s ...
    while time.time() < until:
        assert background.healthy(st["url"], timeout=10)
        time.sleep(0.5)
    deadline = time.time() + 60  # ... then it stops on its own
    while background.state() is not None and time.time() < deadline:
        time.sleep(0.5)
    assert background.state() is None and not alive(st["pid"])
    log = Path(home["CHATFORGE_HOME"], "prefect", "background.log").read_text()
    assert "no API activity for 0.1 min: stopping" in log and log.rstrip().endswith("stopped")


def test_switched_off_it_is_not_started(home, monkeypatch, capsys):
    """CHATFORGE_BACKGROUND_SERVER=0 and nothing on 4200: Prefect's temporary server, as before (no PREFECT_API_URL)."""
    import socket

    from flows import background
    from flows import cli as chatforge

    monkeypatch.setenv("CHATFORGE_BACKGROUND_SERVER", "0")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("refused")))
    ready = chatforge._prefect_api()
    ready()
    assert "PREFECT_API_URL" not in os.environ and background.state() is None
    assert capsys.readouterr().err.strip() == ("chatforge: no Prefect server at 127.0.0.1:4200 and CHATFORGE_BACKGROUND_SERVER=0; "
                                               "starting a temporary one for this run")


def test_a_server_that_cannot_start_is_one_line(home, tmp_path):
    """Its database cannot be created: the run ends with one line naming the server's log, and starts nothing else."""
    env = {**home, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/missing/dir/prefect.db"}
    corpus = write_corpus(tmp_path / "docs.jsonl", docs=20)
    r = cli(["run", "--store", str(tmp_path / "store"), "--until", "data", *sets_for(corpus)], env, timeout=300)
    log = Path(home["CHATFORGE_HOME"], "prefect", "background.log")
    assert r.returncode == 1, r.stdout[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("chatforge: error: the background Prefect server at http://127.0.0.1:") and " exited (" in last
    assert last.endswith(f"); full log: {log}; or run with CHATFORGE_BACKGROUND_SERVER=0 for a temporary server")
    assert "Beginning flow run" not in r.stdout and "Traceback" not in r.stdout


def test_a_bad_idle_setting_is_one_line(home, tmp_path):
    r = cli(["run", "--store", str(tmp_path / "store"), "--until", "data"], {**home, "CHATFORGE_SERVER_IDLE_MINUTES": "soon"},
            timeout=120)
    assert r.returncode == 1 and r.stdout.strip() == ("chatforge: error: CHATFORGE_SERVER_IDLE_MINUTES='soon' is not a number "
                                                      "of minutes: e.g. CHATFORGE_SERVER_IDLE_MINUTES=30")
