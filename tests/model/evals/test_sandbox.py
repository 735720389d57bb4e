"""The HumanEval sandbox: real untrusted programs, real limits, real refusals."""
from __future__ import annotations

import os
import resource
import socket
import textwrap
import time
from pathlib import Path

import pytest

from model.evals.sandbox import Outcome, isolation, run_program

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


@pytest.mark.skipif(not isolation()["network_namespace"], reason="unshare --net not available here")
def test_network_namespace_has_only_loopback():
    out = run("""
        import socket
        names = [name for _, name in socket.if_nameindex()]
        assert names == ["lo"], names
    """)
    assert out.passed, out.detail


def test_deleting_outside_files_is_refused(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.mkdir()
    sentinel = victim / "sentinel.txt"
    sentinel.write_text("keep me")
    for attack in (f"import os\nos.remove({str(sentinel)!r})",
                   f"import shutil\nshutil.rmtree({str(victim)!r})",
                   f"import os\nos.rename({str(sentinel)!r}, 'stolen')",
                   f"open({str(sentinel)!r}, 'w').write('overwritten')"):
        out = run_program(attack)
        assert (out.passed, out.status) == (False, "refused"), (attack, out)
    assert sentinel.read_text() == "keep me"


def test_swallowing_the_refusal_still_does_not_pass(tmp_path: Path):
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("x")
    for exit_ in ("raise SystemExit(0)", "os._exit(0)", "pass"):
        out = run(f"""
            import os
            try:
                os.remove({str(sentinel)!r})
            except PermissionError:
                pass
            {exit_}
        """)
        assert (out.passed, out.status) == (False, "refused"), (exit_, out)
    assert sentinel.exists()


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


def test_work_dir_is_writable_and_removed_afterwards():
    out = run("""
        import os, sys, tempfile
        open("scratch.txt", "w").write("ok")
        os.mkdir("sub"); os.rename("scratch.txt", "sub/moved.txt"); os.remove("sub/moved.txt")
        with tempfile.NamedTemporaryFile() as f:
            f.write(b"ok")
        print(os.getcwd(), file=sys.stderr)
    """)
    assert out.passed, out.detail
    workdir = Path(out.detail.splitlines()[-1])
    assert "chatforge-sandbox-" in str(workdir)
    assert not workdir.exists() and not workdir.parent.exists()


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
                f"import os\nos.remove({str(tmp_path)!r})", "import os\nos.kill(os.getppid(), 9)", good]
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
    assert report["audit_hook"] is True
    assert {"RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_CORE"} <= set(report["rlimits"])
    assert isinstance(report["network_namespace"], bool)
    assert ("RLIMIT_NPROC" in report["rlimits"]) == (os.getuid() != 0)
