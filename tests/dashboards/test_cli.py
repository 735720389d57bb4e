"""`chatforge dashboard` bad input: one line naming the problem and the fix, exit 1, nothing started."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dashboards.cli import command
from helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", "dashboard", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_streamlit_command_is_headless_without_telemetry_on_the_given_address():
    import argparse

    cmd = command(argparse.Namespace(host="127.0.0.1", port=8599))
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4].endswith("dashboards/app.py")
    opts = dict(zip(cmd[5::2], cmd[6::2]))
    assert opts["--server.headless"] == "true" and opts["--browser.gatherUsageStats"] == "false"
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8599"


@pytest.mark.parametrize("args, message", [
    (["--store", "ftpx://host/store"], "unknown store scheme 'ftpx'"),
    (["--store", "ftp://127.0.0.1:{port}/store"], "cannot reach the store ftp://127.0.0.1:"),
    (["--store", "{tmp}", "--port", "70000"], "port 70000 is out of range"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    r = cli(*[a.format(port=free_port(), tmp=tmp_path) for a in args])
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("chatforge: error: ") and message in r.stderr
    assert r.stdout == ""  # no URL printed: nothing was started


def test_busy_port_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("--store", str(tmp_path), "--port", str(port))
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
