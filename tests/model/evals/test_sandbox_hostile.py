"""Hostile programs against the HumanEval sandbox (issue 13): each is refused or contained, nothing lands outside,
no process outlives the run, and the evaluator survives.

Every attack runs twice, with the audit hook on and off (`audit_hook=False`): the second run shows that the
OS boundary alone contains it, since an audit hook can be walked around. The attacks that write files or
start processes also run once unconfined (a positive control, aimed only at this test's tmp_path), so a
test cannot pass just because its attack was miswritten for this Python."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from model.evals.sandbox import REPO, run_program

HOOK = pytest.mark.parametrize("audit_hook", [True, False], ids=["hook", "no-hook"])

# The fork_exec call subprocess.Popen makes on Python >= 3.11 (args up to allow_vfork), minus the audit event.
FORK_EXEC = """
import _posixsubprocess, os, sys
def spawn(code, *extra):
    argv = [sys.executable.encode(), b"-c", code.encode(), *(e.encode() for e in extra)]
    r, w = os.pipe()
    args = [argv, [sys.executable.encode()], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w,
            False, True, -1, None, None, None, -1, None, False]
    try:
        return _posixsubprocess.fork_exec(*args)
    except TypeError:  # a Python without the allow_vfork argument
        return _posixsubprocess.fork_exec(*args[:-1])
"""


def processes_with(marker: str) -> list[int]:
    """PIDs (host view) whose command line contains `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # comm may hold spaces and parens
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run(source: str, prelude: str = "", **kw):
    return run_program(prelude + textwrap.dedent(source), **kw)


def unconfined(source: str) -> None:
    subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(source)], check=True, timeout=30)


def assert_contained(marker: str) -> None:
    """No process of the run left (by its marker, and none under this evaluator), the evaluator alive."""
    time.sleep(0.2)
    assert processes_with(marker) == []
    assert descendants(os.getpid()) <= BEFORE  # a session fixture's server may be a child of this process


BEFORE: set[int] = set()  # this process's children before the test: not the sandbox's to clean up


@pytest.fixture(autouse=True)
def _children_before():
    BEFORE.clear()
    BEFORE.update(descendants(os.getpid()))


@pytest.fixture
def targets(tmp_path: Path):
    """Directories an escaping write would land in: this test's own, the repository, the host's /tmp, /."""
    name = f"escaped-{uuid.uuid4().hex}"
    dirs = [str(tmp_path), str(REPO), tempfile.gettempdir(), "/", sys.prefix]
    yield name, dirs
    for d in dirs:  # only if a test failed: do not leave its litter behind
        p = Path(d) / name
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        elif p.exists() or p.is_symlink():
            p.unlink()


WRITES = {
    "dir_fd": """
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.write(os.open(NAME, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), b"escaped")""",
    "sqlite3": """
        import sqlite3
        db = sqlite3.connect(os.path.join(d, NAME))
        db.execute("create table t (x)"); db.commit()""",
    "mkfifo": """
        os.mkfifo(os.path.join(d, NAME))""",
}


@HOOK
@pytest.mark.parametrize("how", sorted(WRITES))
def test_writes_outside_land_nowhere(how: str, audit_hook: bool, targets, tmp_path: Path):
    name, dirs = targets
    body = textwrap.indent(textwrap.dedent(WRITES[how]), "        ")
    program = f"""
import os, sys
NAME = {name!r}
for d in {dirs!r}:
    try:
{body}
        print("wrote in", d, file=sys.stderr)
    except Exception as e:
        print("blocked in", d, repr(e), file=sys.stderr)
"""
    control = program.replace(repr(dirs), repr([str(tmp_path)]))
    unconfined(control)
    assert (tmp_path / name).exists()  # the attack itself works where nothing stops it
    (tmp_path / name).unlink()
    out = run_program(program, audit_hook=audit_hook)
    # the hook refuses what it can see (sqlite3.connect); an os.open relative to a dir_fd, or os.mkfifo, it
    # cannot, and then the read-only mounts are what stops the write
    assert out.status in ("refused", "passed"), out
    for d in dirs:
        assert not os.path.lexists(os.path.join(d, name)), (how, d)


@HOOK
def test_process_with_new_session_does_not_outlive_the_run(audit_hook: bool, tmp_path: Path):
    marker = f"sandbox-marker-{uuid.uuid4().hex}"
    control_out, out_file = tmp_path / "control", tmp_path / "escaped"
    sleeper = "import sys, time; time.sleep(1.0); open(sys.argv[2], 'w').write('outlived the sandbox')"
    unconfined(FORK_EXEC + f"spawn({sleeper!r}, {marker!r}, {str(control_out)!r})")
    deadline = time.monotonic() + 10
    while not control_out.exists() and time.monotonic() < deadline:  # the control's sleeper writes in ~1 s
        time.sleep(0.1)
    assert control_out.read_text() == "outlived the sandbox"

    out = run(prelude=FORK_EXEC, source=f"""
        import time
        try:
            print("spawned", spawn({sleeper!r}, {marker!r}, {str(out_file)!r}), file=sys.stderr)
        except OSError as e:
            print("spawn failed", e, file=sys.stderr)
        time.sleep(0.2)
        assert False, "not a solution"
    """, audit_hook=audit_hook)
    assert not out.passed
    time.sleep(1.5)  # past the moment the sleeper would have written
    assert not out_file.exists()
    assert_contained(marker)


@HOOK
def test_fork_bomb_is_contained(audit_hook: bool):
    marker = f"sandbox-marker-{uuid.uuid4().hex}"
    start = time.monotonic()
    out = run(prelude=FORK_EXEC, source=f"""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                spawn("import time; time.sleep(60)", {marker!r})
    """, timeout=3.0, audit_hook=audit_hook)
    assert not out.passed and out.status in ("refused", "failed", "timeout"), out
    assert time.monotonic() - start < 6
    assert_contained(marker)


def test_thread_bomb_is_bounded_and_gone():
    out = run("""
        import threading, time
        while True:
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    """, timeout=3.0, audit_hook=False)
    assert not out.passed and out.status in ("failed", "memory", "timeout"), out
    assert descendants(os.getpid()) <= BEFORE  # a session fixture's server may be a child of this process


def test_signals_reach_no_process_outside(tmp_path: Path):
    """pidfd and kill against the evaluator (by its real PID), a bystander, the sandbox's parent and init; the
    evaluator is a separate process here, so a broken sandbox shows as its death, not this test run's."""
    bystander = subprocess.Popen(["sleep", "60"])
    attack = f"""
        import os, signal, sys
        for pid in (os.getppid(), 1, {{evaluator}}, {bystander.pid}):
            for how in ("pidfd", "kill"):
                try:
                    if how == "pidfd":
                        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                    print(how, pid, "sent", file=sys.stderr)
                except OSError as e:
                    print(how, pid, e, file=sys.stderr)
        if os.getpid() <= 3:  # only inside a PID namespace of its own: every process it is allowed to signal
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:  # there is none but itself and init
                pass
    """
    evaluator = f"""
import json, os, textwrap
from model.evals.sandbox import run_program
out = run_program(textwrap.dedent({attack!r}).replace("{{evaluator}}", str(os.getpid())), timeout=30,
                  audit_hook=False)
print(json.dumps(out.__dict__))
"""
    try:
        before = set(os.listdir(tempfile.gettempdir()))
        done = subprocess.run([sys.executable, "-c", evaluator], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        outcome = json.loads(done.stdout.strip().splitlines()[-1])
        assert outcome["status"] == "passed", outcome  # it ran every attempt to the end, and nothing died
        assert alive(bystander.pid)
        assert {n for n in set(os.listdir(tempfile.gettempdir())) - before if "sandbox" in n} == set()
    finally:
        bystander.kill()
        bystander.wait()


def test_killed_evaluator_takes_its_sandbox_along():
    """The evaluator dies mid-run (SIGKILL, no cleanup): bwrap follows it and the PID namespace empties."""
    evaluator = "from model.evals.sandbox import run_program\nrun_program('import time\\ntime.sleep(60)', timeout=60)"
    proc = subprocess.Popen([sys.executable, "-c", evaluator], cwd=REPO)
    try:
        deadline, tree = time.monotonic() + 20, set()
        while len(tree) < 3 and time.monotonic() < deadline:  # bwrap, its init, the program
            time.sleep(0.1)
            tree = descendants(proc.pid)
        assert len(tree) >= 3, tree
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in tree)


def test_timeout_kills_every_process_of_the_run():
    """A program that ignores every catchable signal and sleeps: on timeout its whole PID namespace goes."""
    import threading
    result, tree = [], set()
    worker = threading.Thread(target=lambda: result.append(run("""
        import signal, time
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        time.sleep(600)
    """, timeout=2.0, audit_hook=False)))
    worker.start()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # bwrap, its init and the program, seen while they run
        tree |= descendants(os.getpid()) - BEFORE
        time.sleep(0.1)
    worker.join()
    assert result[0].status == "timeout" and len(tree) >= 3, (result, tree)
    time.sleep(0.2)
    assert not any(alive(p) for p in tree)


@HOOK
def test_secrets_and_host_files_are_not_visible(audit_hook: bool):
    hidden = ["/etc/shadow", "/etc/passwd", "/etc/hostname", "/proc", "/home", "/var", "/run", str(REPO),
              str(REPO / "pyproject.toml"), str(REPO.parent / "shared"), os.environ["CHATFORGE_HOME"],
              os.path.expanduser("~/.ssh"), "/usr/bin/sh", "/usr/share", "/usr/local/bin"]
    out = run(f"""
        import os
        for p in {[p for p in hidden if not sys.prefix.startswith(p)]!r}:
            assert not os.path.exists(p), p
        assert set(os.listdir("/etc")) <= {{"ld.so.cache"}}, os.listdir("/etc")
        assert os.getcwd() == "/tmp" and os.environ["HOME"] == "/tmp"
    """, audit_hook=audit_hook)
    assert out.passed, out.detail


def test_reading_shadow_fails_and_leaks_nothing():
    out = run("""
        import sys
        print(open("/etc/shadow").read(), file=sys.stderr)
    """, audit_hook=False)
    assert (out.passed, out.status) == (False, "failed")
    assert "FileNotFoundError" in out.detail and "root:" not in out.detail


@HOOK
@pytest.mark.parametrize("fake", ["os._exit(0)", "sys.exit(0)", "raise SystemExit", "os.kill(os.getpid(), 9)"])
def test_faking_a_pass_without_the_checks_fails(fake: str, audit_hook: bool):
    """Close every fd (the refusal file, the token file), scribble guesses into them, then leave with status 0."""
    out = run(f"""
        import os, sys
        for fd in range(3, 256):
            try:
                os.write(fd, b"0" * 32)
            except OSError:
                pass
            try:
                os.close(fd)
            except OSError:
                pass
        {fake}
        def check(candidate):
            assert candidate() == 42
        check(lambda: 41)
    """, audit_hook=audit_hook)
    assert not out.passed, out
    assert out.status in ("failed", "refused"), out


def test_swallowed_refusal_with_a_clean_exit_is_refused(tmp_path: Path):
    out = run("""
        import socket
        try:
            socket.create_connection(("127.0.0.1", 9))
        except Exception:
            pass
    """)
    assert (out.passed, out.status) == (False, "refused")


@HOOK
def test_memory_hog_is_stopped(audit_hook: bool):
    out = run("""
        blocks = []
        while True:
            blocks.append(bytearray(64 * 1024 * 1024))
    """, memory_mb=512, audit_hook=audit_hook)
    assert (out.passed, out.status) == (False, "memory"), out


def test_filling_the_tmpfs_stops_at_its_size():
    out = run("""
        for i in range(64):
            with open(f"/tmp/fill{i}", "wb") as f:
                f.write(b"x" * (8 * 1024 * 1024))
    """, audit_hook=False)
    assert not out.passed and "No space left on device" in out.detail, out


@HOOK
def test_network_is_unreachable(audit_hook: bool):
    import socket
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        out = run(f"""
            import socket
            assert [n for _, n in socket.if_nameindex()] == ["lo"]
            connected = []
            for addr in (("127.0.0.1", {port}), ("1.1.1.1", 80), ("8.8.8.8", 53)):
                try:
                    socket.create_connection(addr, timeout=2).sendall(b"hello")
                    connected.append(addr)
                except OSError as e:
                    print(addr, e)
            assert not connected, connected
        """, audit_hook=audit_hook)
        assert out.status == ("refused" if audit_hook else "passed"), out
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()
