"""The HumanEval sandbox: real untrusted programs, real limits, real refusals, the completion token.
The hostile programs of issue 13 are in test_sandbox_hostile.py, the 164 canonical solutions in
test_sandbox_humaneval.py."""
from __future__ import annotations

import os
import resource
import socket
import textwrap
import tempfile
import time
from pathlib import Path

import pytest

from model.evals import sandbox
from model.evals.sandbox import Outcome, SandboxUnavailable, isolation, run_program

HUMANEVAL = '''
from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than threshold."""
    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i != j and abs(a - b) < threshold:
                return {answer}
    return not {answer}


def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True


check(has_close_elements)
'''


def run(source: str, **kw) -> Outcome:
    return run_program(textwrap.dedent(source), **kw)


def test_correct_humaneval_program_passes_quickly():
    out = run_program(HUMANEVAL.format(answer="True"))
    assert out == Outcome(True, "passed", out.detail, out.seconds)
    assert out.seconds < 2.0


def test_wrong_program_fails_with_the_assertion():
    out = run_program(HUMANEVAL.format(answer="False"))
    assert (out.passed, out.status) == (False, "failed")
    assert "AssertionError" in out.detail and len(out.detail) <= 300


def test_syntax_error_fails():
    assert run("def f(:\n").status == "failed"


def test_infinite_loop_times_out():
    out = run("while True: pass", timeout=1.0)
    assert (out.passed, out.status) == (False, "timeout")
    assert 0.9 < out.seconds < 3.0


def test_default_timeout_is_bounded():
    out = run("import time\ntime.sleep(600)")  # wall clock, not CPU: only the kill ends this
    assert out.status == "timeout"
    assert 4.9 < out.seconds < 8.0


def test_child_runs_under_the_limits():
    out = run("""
        import resource
        assert resource.getrlimit(resource.RLIMIT_AS) == (256 * 1024**2,) * 2
        assert resource.getrlimit(resource.RLIMIT_CPU)[0] == 2
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
        assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] <= 16 * 1024**2
        assert resource.getrlimit(resource.RLIMIT_NPROC) == (32, 32)
        resource.setrlimit(resource.RLIMIT_AS, (-1, -1))  # raising them back is refused
    """, timeout=2.0, memory_mb=256)
    assert out.status == "refused" and "resource.setrlimit" in out.detail


def test_huge_allocation_is_memory_and_parent_unaffected():
    before = resource.getrlimit(resource.RLIMIT_AS)
    out = run("x = bytearray(10 * 1024**3)")
    assert (out.passed, out.status) == (False, "memory")
    assert out.seconds < 3.0
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert len(bytearray(64 * 1024**2)) == 64 * 1024**2


def test_connect_to_local_listener_is_refused_and_never_arrives():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        out = run(f"""
            import socket
            s = socket.socket()
            s.settimeout(2)
            s.connect(("127.0.0.1", {port}))
            s.sendall(b"hello")
        """)
        assert (out.passed, out.status) == (False, "refused")
        assert "socket.connect" in out.detail
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()


def test_network_namespace_has_only_loopback():
    out = run("""
        import socket
        names = [name for _, name in socket.if_nameindex()]
        assert names == ["lo"], names
    """)
    assert out.passed, out.detail


# Outside the work directory, and read-only or absent inside: the hook refuses before the kernel would.
VICTIM = "/usr/lib/chatforge-sandbox-victim"


def test_deleting_outside_files_is_refused(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.mkdir()
    sentinel = victim / "sentinel.txt"
    sentinel.write_text("keep me")
    for target in (VICTIM, str(sentinel)):  # the host's tmp_path is not even visible: /tmp is the sandbox's own
        for attack in (f"import os\nos.remove({target!r})", f"import shutil\nshutil.rmtree({target!r})",
                       f"import os\nos.rename({target!r}, '/usr/lib/stolen')", f"open({target!r}, 'w').write('x')"):
            out = run_program(attack)
            assert not out.passed, (attack, out)
            assert out.status == "refused" or target == str(sentinel), (attack, out)
    assert sentinel.read_text() == "keep me"


def test_swallowing_the_refusal_still_does_not_pass():
    for exit_ in ("raise SystemExit(0)", "os._exit(0)", "pass"):
        out = run(f"""
            import os
            try:
                os.remove({VICTIM!r})
            except PermissionError:
                pass
            {exit_}
        """)
        assert (out.passed, out.status) == (False, "refused"), (exit_, out)


def test_process_creation_is_refused(tmp_path: Path):
    marker = tmp_path / "touched"
    for attack in (f"import os\nos.system('touch {marker}')",
                   f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
                   "import os\nos.fork()",
                   "import ctypes\nctypes.CDLL(None).system(b'true')"):
        out = run_program(attack)
        assert out.status == "refused", (attack, out)
    assert not marker.exists()


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token-value")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-injected")
    out = run("""
        import os, sys
        print(dict(os.environ))
        assert "HF_TOKEN" not in os.environ
        assert "secret-token-value" not in repr(os.environ)
        assert "/nonexistent-injected" not in sys.path
        assert os.environ["HOME"] == os.getcwd()
        assert sys.stdin.read() == ""
    """)
    assert out.passed, out.detail


def test_work_dir_is_a_private_tmpfs_that_vanishes(tmp_path: Path):
    name = f"scratch-{os.getpid()}-{time.monotonic_ns()}.txt"
    out = run(f"""
        import os, tempfile
        assert os.getcwd() == "/tmp" == tempfile.gettempdir()
        assert not os.path.exists({name!r})
        open({name!r}, "w").write("ok")
        os.mkdir("sub"); os.rename({name!r}, "sub/moved.txt"); os.rename("sub/moved.txt", {name!r})
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"ok")
    """)
    assert out.passed, out.detail
    assert not (Path(tempfile.gettempdir()) / name).exists()  # the host's /tmp never saw it
    again = run(f"import os\nassert not os.path.exists({name!r})")  # nor does the next program
    assert again.passed, again.detail
    read_only = run("open('/sandbox/program.py', 'a').write('x')", audit_hook=False)
    assert read_only.status == "failed" and "Read-only file system" in read_only.detail


def test_output_flood_is_capped_and_does_not_hang():
    start = time.monotonic()
    out = run("""
        import sys
        chunk = "x" * (1024 * 1024)
        for _ in range(100):
            sys.stdout.write(chunk)
    """)
    assert not out.passed and out.status == "failed"
    assert time.monotonic() - start < 5.0


def test_evaluation_continues_after_a_misbehaving_program(tmp_path: Path):
    good = HUMANEVAL.format(answer="True")
    programs = [good, "while True: pass", "x = bytearray(10 * 1024**3)",
                f"import os\nos.remove({VICTIM!r})", "import os\nos.kill(os.getppid(), 9)", good]
    statuses = [run_program(p, timeout=1.0).status for p in programs]
    assert statuses == ["passed", "timeout", "memory", "refused", "refused", "passed"]


def test_common_imports_still_work():
    out = run("""
        import math, re, heapq, itertools, collections, functools, string, hashlib, fractions, random
        from typing import List, Tuple
        assert math.gcd(12, 18) == 6
    """)
    assert out.passed, out.detail


def test_isolation_report():
    report = isolation()
    assert report["boundary"] == "bubblewrap" and report["bubblewrap"].startswith("bubblewrap ")
    assert {"user", "pid", "mount", "network", "ipc"} <= set(report["namespaces"])
    assert report["network_namespace"] is True and report["completion_token"] is True
    assert report["audit_hook"] is True
    assert {"RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_NPROC"} <= set(report["rlimits"])


def test_missing_bwrap_is_a_clear_error_and_nothing_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    marker = tmp_path / "ran"
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    sandbox._bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap"):
            sandbox.require()
        with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap"):
            run_program(f"open({str(marker)!r}, 'w')")
        assert isolation()["boundary"] is None  # the report still renders, it says there is no boundary
    finally:
        monkeypatch.undo()
        sandbox._bwrap.cache_clear()
    assert not marker.exists()


def test_bwrap_that_cannot_build_a_sandbox_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    fake = tmp_path / "bwrap"  # what bwrap says where user namespaces are disabled
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sandbox._bwrap.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match=r"cannot build .*No permissions to creating new namespace"):
            run_program("pass")
    finally:
        monkeypatch.undo()
        sandbox._bwrap.cache_clear()


@pytest.mark.parametrize("ending", ["sys.exit(0)", "os._exit(0)", "raise SystemExit", "check(lambda: 41)"])
def test_only_the_completion_token_passes(ending: str):
    """The same program passes when its checks return; every way of ending before that, or a failing check,
    exits without the token and fails, whatever the exit status."""
    program = """
        import os, sys
        def check(candidate):
            assert candidate() == 42
        {ending}
        check(lambda: 42)
    """
    assert run(program.format(ending="pass")).passed
    out = run(program.format(ending=ending))
    assert (out.passed, out.status) == (False, "failed"), out
    if ending != "check(lambda: 41)":
        assert "completion token" in out.detail


def test_the_bootstrap_frame_is_not_handed_out():
    out = run("import sys\nsys._getframe(1)")
    assert out.status == "refused" and "sys._getframe" in out.detail
    assert run("import gc\ngc.get_objects()").status == "refused"
    typing = run("from typing import TypeVar, NamedTuple\nT = TypeVar('T')\nP = NamedTuple('P', [('x', int)])")
    assert typing.passed, typing.detail  # what calls sys._getframe for its own frame still works
