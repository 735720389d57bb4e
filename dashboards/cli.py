"""`chatforge dashboard`: start the Streamlit app (dashboards/app.py) on the store, headless, no telemetry.

Wiring (flows/cli.py): `add_arguments(sub.add_parser("dashboard", help=HELP))` and `cmd_dashboard(args)`.
The store reaches the app through $CHATFORGE_DASHBOARD_STORE (Streamlit passes script arguments too, but an
environment variable also reaches every rerun of every session without parsing). Bad input (an unknown
store scheme, a busy port) fails here in one line, before Streamlit starts.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from . import STORE_ENV

APP = Path(__file__).resolve().parent / "app.py"
ROOT = APP.parents[1]
HELP = "browse runs in a web dashboard: cost / time / score per run and stage, Pareto frontier, curves, report cards, chat"
STORE_HELP = "artifact store: a directory or fsspec URL (default: $CHATFORGE_HOME or ~/.cache/chatforge)"


def add_arguments(p) -> None:
    p.add_argument("--store", default=None, help=STORE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port (default: 8501)")


def command(args) -> list[str]:
    """The `streamlit run` command line: headless (no browser opened, no e-mail prompt), no usage statistics,
    no file watcher (the app is installed code, not being edited), bound to --host/--port."""
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.address", args.host, "--server.port", str(args.port),
            "--server.fileWatcherType", "none", "--server.runOnSave", "false",
            "--global.developmentMode", "false", "--client.toolbarMode", "viewer",
            "--theme.base", "light"]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_dashboard(args) -> int:
    from artifacts.errors import StoreError
    from artifacts.store import Store
    from serve.cli import _check_port

    try:
        store = Store(args.store)
    except StoreError:
        raise  # an unknown scheme, a missing fsspec backend: already one line
    except Exception as e:  # noqa: BLE001 - a refused connection, bad credentials: one line, nothing started
        raise StoreError(f"cannot reach the store {args.store} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}): "
                         "check the URL, the network and the credentials") from None
    _check_port(args.host, args.port)
    url = os.path.abspath(store.root) if store.local else store.url  # absolute: the app may not share our cwd
    env = {**os.environ, STORE_ENV: url, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"chatforge dashboard: http://{host}:{args.port}  (store {url}; Ctrl-C stops it)", flush=True)
    proc = subprocess.Popen(command(args), env=env, stdout=subprocess.DEVNULL)
    # SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does, instead of leaving it orphaned
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
