"""The background Prefect server that `chatforge run` leaves running, so that later runs attach instead of starting one.

Prefect's temporary server costs a run 10-15 s of start-up, every run. Instead the first run with no server
starts `python -m flows.background serve` detached: Prefect's server app (API, UI, services) under uvicorn on
127.0.0.1 (port 4200 when free, else any free one), its database the one `chatforge server` uses
($CHATFORGE_HOME/prefect/prefect.db), telemetry off, its log in $CHATFORGE_HOME/prefect/background.log.

One per chatforge home: the server holds an exclusive lock on `background.lock` for as long as it lives. The
lock, not a pid file, says whether it runs, so a killed server leaves no stale claim and a recycled pid is never
signalled; starters serialize on `start.lock`, so two concurrent runs start one server and both attach.
It stops itself after IDLE_MINUTES with no API request in flight or made (a run's event stream, a worker's
polling and an open UI tab all count); `chatforge server --stop` stops it now. CHATFORGE_BACKGROUND_SERVER=0
turns it off (a temporary server per run, as before); the test suite runs that way.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from model.errors import InputError

SWITCH = "CHATFORGE_BACKGROUND_SERVER"  # 0/off/false/no: a temporary server per run instead
IDLE_ENV = "CHATFORGE_SERVER_IDLE_MINUTES"
PORT_ENV = "CHATFORGE_SERVER_PORT"  # the port tried first (then any free one)
# Long enough for an edit-and-rerun loop or a coffee break to find it warm; short enough that a forgotten one
# (~250 MB of memory, no CPU when idle) goes away on its own the same afternoon.
IDLE_MINUTES = 30.0
PORT = 4200  # Prefect's and `chatforge server`'s port: the UI address people know
STARTUP_SECONDS = 180  # a first start creates the database (migrations): tens of seconds on a slow disk


class BackgroundError(InputError):
    """The background server did not start or stop; the message names the log and the way around it."""


def enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def idle_minutes() -> float:
    try:
        return float(os.environ.get(IDLE_ENV) or IDLE_MINUTES)
    except ValueError:
        raise BackgroundError(f"{IDLE_ENV}={os.environ[IDLE_ENV]!r} is not a number of minutes: e.g. {IDLE_ENV}=30") from None


def folder() -> Path:
    """$CHATFORGE_HOME/prefect (~/.cache/chatforge/prefect when the home is remote), where `chatforge server` keeps
    its database too."""
    from artifacts.store import DEFAULT_ROOT

    home = os.environ.get("CHATFORGE_HOME") or DEFAULT_ROOT
    if "://" in home and not home.startswith("file://"):
        home = DEFAULT_ROOT
    return Path(home.removeprefix("file://")).expanduser() / "prefect"


def _paths() -> tuple[Path, Path, Path, Path]:
    d = folder()
    return d / "background.lock", d / "start.lock", d / "background.json", d / "background.log"


def _held(lock: Path) -> bool:
    """Whether a live server holds `lock` (a shared probe fails against its exclusive hold; no file, no server)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def state() -> dict | None:
    """{pid, port, url, ui, idle_minutes, started} of this home's background server while one runs (maybe still
    starting), else None."""
    lock, _, info, _ = _paths()
    if not _held(lock):
        return None
    for _ in range(50):  # the holder writes the file right after taking the lock
        try:
            return json.loads(info.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            if not _held(lock):
                return None
            time.sleep(0.02)
    return None


def healthy(url: str, timeout: float = 1.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def start() -> tuple[dict, bool]:
    """This home's background server, started unless one runs: (its state, whether this call started it). Returns
    once the server holds its lock and has chosen its port; `wait` waits for its API."""
    lock, start_lock, _, log = _paths()
    lock.parent.mkdir(parents=True, exist_ok=True)
    idle_minutes()  # a bad setting fails here, not in the detached server
    with open(start_lock, "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # two runs at once: the second finds the first one's server
        if st := state():
            return st, False
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with open(log, "w") as out:  # one log per server: what `_tail` quotes is this start's
            proc = subprocess.Popen([sys.executable, "-m", "flows.background", "serve"], env=env, cwd=lock.parent,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while (st := state()) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BackgroundError(f"the background Prefect server did not start ({_tail(log)}); full log: {log}; "
                                      f"or run with {SWITCH}=0 for a temporary server")
            time.sleep(0.02)
        return st, True


def wait(st: dict, timeout: float = STARTUP_SECONDS, meanwhile=None) -> None:
    """Until the server's API answers; a server that exits or hangs is a one-line error naming its log.
    `meanwhile`: work to do first if it does not answer yet (the caller's later imports: a core is free)."""
    lock, _, _, log = _paths()
    deadline = time.monotonic() + timeout
    if meanwhile is not None and not healthy(st["url"]):
        meanwhile()
    while not healthy(st["url"]):
        if not _held(lock) or time.monotonic() > deadline:
            why = "exited" if not _held(lock) else f"did not answer within {timeout:.0f} s"
            raise BackgroundError(f"the background Prefect server at {st['ui']} {why} ({_tail(log)}); full log: {log}; "
                                  f"or run with {SWITCH}=0 for a temporary server")
        time.sleep(0.05)


def stop(timeout: float = 30) -> dict | None:
    """Stop this home's background server (SIGTERM, then SIGKILL after `timeout`); its state, or None if none ran."""
    lock = _paths()[0]
    st = state()
    if st is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(st["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _held(lock):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(st["pid"], signal.SIGKILL)  # its own session: uvicorn and anything it started
        time.sleep(0.05)
    return st


def how_to_stop(st: dict) -> str:
    return f"stops after {st['idle_minutes']:g} min idle; stop now: chatforge server --stop"


def _tail(log: Path, lines: int = 2) -> str:
    try:
        text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return " | ".join(text[-lines:])[-300:] or "its log is empty"


# ------------------------------------------------------------------ the server process

class Activity:
    """ASGI wrapper: requests in flight (an open websocket stays in flight) and when the last one ended."""

    def __init__(self, app):
        self.app, self.in_flight, self.last = app, 0, time.monotonic()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.last = time.monotonic()

    def idle_for(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self.last


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM/SIGINT stop it gracefully, then `serve` returns (uvicorn's own handling re-raises the signal
            afterwards, which would kill the process before it removes its state file)."""
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)
            yield

    return Server


def _bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:`port`, else on a free port: uvicorn takes it as is, so no other program
    can take the port between the choice and the start."""
    for p in (port, 0):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            s.close()
            continue
        s.listen(2048)
        return s
    raise OSError("no free port on 127.0.0.1")


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} chatforge background server: {message}", flush=True)


def serve() -> int:
    """The server process: take the lock (or leave: one runs already), publish the state, serve until idle."""
    lock, _, info, _ = _paths()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _log("another one already runs for this home; leaving")
        return 0
    idle = idle_minutes()
    sock = _bind(int(os.environ.get(PORT_ENV) or PORT))
    port = sock.getsockname()[1]
    ui = f"http://127.0.0.1:{port}"
    st = {"pid": os.getpid(), "port": port, "url": f"{ui}/api", "ui": ui, "idle_minutes": idle,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = info.with_suffix(".tmp")
    tmp.write_text(json.dumps(st))
    tmp.replace(info)
    _log(f"pid {os.getpid()} at {ui}, stops after {idle:g} min idle")
    try:
        return _run(sock, st, idle)
    finally:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if json.loads(info.read_text()).get("pid") == os.getpid():
                info.unlink()
        _log("stopped")


def _run(sock: socket.socket, st: dict, idle: float) -> int:
    from flows.server import server_env

    # before Prefect reads its settings: our database and telemetry off; the UI talks to this address
    os.environ.update(server_env())
    for name in ("PREFECT_API_URL", "PREFECT_UI_API_URL"):
        os.environ[name] = st["url"]
    import uvicorn
    from prefect.server.api.server import create_app

    app = Activity(create_app(final=True))
    server = _server_class()(uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=5))

    def watch() -> None:
        while not server.started and not server.should_exit:  # a first start creates the database: not idle time
            time.sleep(0.1)
        app.last = time.monotonic()
        while not server.should_exit:
            time.sleep(min(15.0, max(idle * 60 / 20, 0.2)))
            if app.idle_for() >= idle * 60:
                _log(f"no API activity for {idle:g} min: stopping")
                server.should_exit = True

    threading.Thread(target=watch, daemon=True).start()
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m flows.background serve  (started by `chatforge run`; stop it: chatforge server --stop)")
    try:
        sys.exit(serve())
    except InputError as e:
        _log(f"error: {e}")
        sys.exit(1)
