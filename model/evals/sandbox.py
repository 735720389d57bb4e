"""Run untrusted model-generated Python (a HumanEval completion plus its unit tests) behind an OS boundary.

`run_program(program)` runs the program inside bubblewrap (`bwrap`, Debian package `bubblewrap`) and says how it
ended (`Outcome.status`): "passed", "failed", "timeout", "memory", "refused" (the audit hook caught a forbidden
operation) or "error" (the sandbox itself failed). Without a working bwrap it raises `SandboxUnavailable`
naming the fix; there is no weaker fallback, because a HumanEval score is only as honest as its sandbox.

Threat model. The program is hostile: written to escape, to harm the evaluator, or to fake a pass. It may run
any Python and reach around anything in its own interpreter (ctypes, `_posixsubprocess`, closing fds).
The boundary is therefore the kernel, not Python:

- Namespaces (bwrap): new user, PID, mount, network, IPC, UTS and cgroup namespaces, all capabilities dropped,
  no nested user namespaces. The program sees no other process (it cannot signal, ptrace or `pidfd_open`
  the evaluator: its PID space holds only bwrap's init and itself), reaches no network (the namespace has only
  loopback), and shares no System V IPC with the host.
- Filesystem: an empty root holding, read-only, only what the interpreter needs: /usr/lib* and the /lib*
  links (the loader and shared libraries), /etc/ld.so.cache, the interpreter's own prefix(es) (for a system
  Python, only its library directories). /etc (so /etc/shadow), /home, /root, the repository, the artifact
  store and the evaluator's temporary files are not there at all. /dev is bwrap's minimal device set,
  read-only; there is no /proc. The only writable place is a private tmpfs at /tmp (the cwd, HOME and TMPDIR,
  64 MiB), which disappears with the namespace: nothing the program writes survives the run or lands on
  the host. The program's source is copied in read-only; its output goes to unnamed (already deleted)
  files, so even an evaluator killed mid-run leaves nothing on disk.
- Lifetime: the program runs in a new PID namespace under bwrap's init; when the program exits, is killed
  on timeout (SIGKILL to bwrap's process group) or the evaluator dies (`--die-with-parent`), that init dies
  and the kernel kills every process in the namespace. Nothing outlives the run.
- Resources: rlimits as before (RLIMIT_AS = memory_mb, so a huge allocation is a MemoryError; RLIMIT_CPU;
  RLIMIT_FSIZE 16 MiB, which also caps output; RLIMIT_CORE 0; RLIMIT_NPROC) plus the wall-clock timeout.
  RLIMIT_NPROC does not bind host root, so a seccomp filter (sandbox_seccomp.py) makes process creation
  fail in the kernel and closes kernel interfaces no solution needs (ptrace, keyrings, eBPF, io_uring,
  mount, unshare, ...). Threads are allowed.
- Pass verdict: a program passes only when the harness's completion token reaches the evaluator: a fresh
  random nonce per run, handed to the bootstrap (sandbox_child.py) on a pipe it reads and closes before the
  program starts, written to an unnamed file only after the program's top-level code (ending with the task's
  `check(...)` call) has returned, and compared byte for byte. Exit status alone never counts:
  `os._exit(0)`, `sys.exit(0)`, closed fds or a swallowed refusal all end without the token.
- The PEP 578 audit hook stays as defence in depth: it turns the common forbidden operations (sockets,
  process creation, signals, writes outside /tmp, ctypes, rlimit changes) into a "refused" verdict with a
  readable reason. It is not the boundary; a program that slips past it is still inside the namespaces.

What this does NOT protect against. (1) Kernel bugs: the program shares the host kernel (the seccomp filter
narrows what it can reach, nothing more); for code from an adversary that would burn a kernel exploit on
this, use a VM. (2) A program cheating its own score: the token proves the harness's code after the
program ran, and the program shares that interpreter, so one that walks the frame stack to the bootstrap
(`frame.f_back`, not audited) can read the nonce and write the token early. That fakes one pass and nothing
more: it cannot reach the evaluator, another run or the disk. Semantic cheats (an object whose `__eq__` is
always True, a module-level `abs` that shadows the builtin the tests call) are in the same class: the tests
of the task decide correctness, not the sandbox. (3) Memory is bounded per process (RLIMIT_AS), not by a
cgroup: parallel runs add up (workers x memory_mb, plus at most 64 MiB of tmpfs each). (4) An evaluator
running as root runs the program as host uid 0 without capabilities; that matters only for what is mounted,
which is read-only system files. (5) Without bwrap, or where user namespaces are disabled (some
distributions restrict them by sysctl or AppArmor), nothing runs.
"""
from __future__ import annotations

import functools
import hmac
import os
import secrets
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from model.errors import InputError
from model.evals import sandbox_seccomp

FSIZE_BYTES = 16 * 1024 * 1024
TMPFS_BYTES = 64 * 1024 * 1024
NPROC = 32  # bwrap's init, the interpreter and its threads; other processes are refused by seccomp anyway
SETUP_FAILED, REFUSED = 97, 98  # exit codes the bootstrap reserves
DETAIL_CHARS = 300
WORK, PROGRAM = "/tmp", "/sandbox/program.py"  # paths inside the sandbox
INSTALL = "apt-get install bubblewrap"
REPO = Path(__file__).resolve().parents[2]
_CHILD = Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": WORK, "TMPDIR": WORK, "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_FLAGS = ("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session",
               "--cap-drop", "ALL", "--hostname", "sandbox")


class SandboxUnavailable(InputError):
    """bwrap is missing or cannot build a sandbox here: HumanEval programs must not run at all (an InputError:
    the stage fails with this one line, naming the fix)."""


@dataclass(frozen=True)
class Outcome:
    passed: bool  # the harness's completion token came back, within the limits, with exit 0
    status: str  # "passed" | "failed" | "timeout" | "memory" | "refused" | "error"
    detail: str  # last line(s) of stderr, at most ~300 chars, for reports
    seconds: float


def _covered(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[str, ...]:
    """bwrap arguments for the read-only view: shared libraries, the loader cache, the interpreter."""
    args: list[str] = []
    system_libs = []
    for d in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(d):  # merged /usr: /lib -> usr/lib, kept as the same link
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
            system_libs.append(d)
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    wanted = {sys.executable, os.path.realpath(sys.executable)}
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        if os.path.realpath(prefix) not in ("/", "/usr", "/usr/local"):
            wanted.add(prefix)  # a venv, pyenv, conda or uv interpreter: its own tree
    # A system interpreter: only its library directories (stdlib, site-packages, libpython), not all of /usr.
    wanted.update(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    wanted.update(site.getsitepackages())
    libpython = sysconfig.get_config_var("INSTSONAME")
    if libpython and sysconfig.get_config_var("LIBDIR"):
        wanted.add(os.path.join(sysconfig.get_config_var("LIBDIR"), libpython))
    roots = list(system_libs)
    for path in sorted(p for p in wanted if p and os.path.exists(p)):  # parents sort before their children
        if _covered(path, roots):
            continue
        if _covered(str(REPO), [path]):
            raise SandboxUnavailable(f"the interpreter's directory {path} contains the repository {REPO}; "
                                     "the sandbox would expose it: use an interpreter installed elsewhere")
        args += ["--ro-bind", path, path]
        roots.append(path)
    return tuple(args)


def _argv(bwrap: str, fds: dict[str, int], memory_mb: int, cpu_s: int, audit_hook: bool) -> list[str]:
    seccomp = ["--seccomp", str(fds["seccomp"])] if "seccomp" in fds else []
    return [bwrap, *_FLAGS, *_mounts(), "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", WORK,
            "--ro-bind-data", str(fds["program"]), PROGRAM, "--remount-ro", "/dev", "--remount-ro", "/",
            "--chdir", WORK, *seccomp, "--", sys.executable, "-I", "-B", "-c", _CHILD, PROGRAM, WORK,
            str(fds["nonce"]), str(fds["token"]), str(fds["refusals"]), str(memory_mb * 1024 * 1024),
            str(cpu_s), str(FSIZE_BYTES), str(NPROC), "1" if audit_hook else "0"]


def _pipe_with(data: bytes, stack: ExitStack) -> int:
    """The read end of a pipe already holding `data` (small: below the pipe buffer) and closed for writing."""
    r, w = os.pipe()
    stack.callback(os.close, r)
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return r


@functools.lru_cache(maxsize=1)
def _bwrap() -> str:
    """The bwrap executable, once a trivial interpreter run inside the full sandbox has worked (cached)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"HumanEval programs run only inside bubblewrap, and `bwrap` is not on PATH: "
                                 f"install it (`{INSTALL}`)")
    with ExitStack() as stack:
        fds = {"program": _pipe_with(b"", stack), "nonce": _pipe_with(b"", stack), "token": 1, "refusals": 2}
        if (bpf := sandbox_seccomp.program()) is not None:
            fds["seccomp"] = _pipe_with(bpf, stack)
        argv = _argv(bwrap, fds, 256, 5, False)
        argv[argv.index("-c") + 1] = "pass"  # only the interpreter, not the bootstrap
        try:
            probe = subprocess.run(argv, env=_ENV, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                                   pass_fds=tuple(fd for name, fd in fds.items() if name not in ("token", "refusals")))
        except (OSError, subprocess.SubprocessError) as e:
            raise SandboxUnavailable(f"bubblewrap ({bwrap}) could not be started: {e}") from e
    if probe.returncode != 0:
        why = probe.stderr.decode("utf-8", "replace").strip()[-DETAIL_CHARS:] or f"exit code {probe.returncode}"
        raise SandboxUnavailable(f"bubblewrap ({bwrap}) cannot build the HumanEval sandbox here: {why} (it needs "
                                 "user namespaces; some systems disable them for unprivileged users)")
    return bwrap


def require() -> None:
    """Raise SandboxUnavailable (naming the fix) unless programs can run here: lets a stage fail before it spends
    time generating HumanEval replies rather than at the first program."""
    _bwrap()


@functools.lru_cache(maxsize=1)
def _bwrap_version(bwrap: str) -> str:
    try:
        return subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def isolation() -> dict:
    """The protections active on this machine, for the evaluation report (never raises)."""
    try:
        bwrap = _bwrap()
    except SandboxUnavailable:
        bwrap = None
    return {"boundary": "bubblewrap" if bwrap else None, "bubblewrap": _bwrap_version(bwrap) if bwrap else None,
            "namespaces": ["user", "pid", "mount", "network", "ipc", "uts", "cgroup"] if bwrap else [],
            "network_namespace": bwrap is not None, "readonly_root": bwrap is not None,
            "seccomp": sandbox_seccomp.machine() if sandbox_seccomp.program() else None,
            "completion_token": True, "audit_hook": hasattr(sys, "addaudithook"),
            "rlimits": ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_NPROC"],
            "isolated_interpreter": True, "scrubbed_env": True, "process_group_kill": True,
            "fsize_bytes": FSIZE_BYTES, "tmpfs_bytes": TMPFS_BYTES}


def _tail(f, limit: int = 4096) -> str:
    f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
    return f.read().decode("utf-8", "replace").strip()


def _short(text: str) -> str:
    return text[-DETAIL_CHARS:]


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024, *, audit_hook: bool = True) -> Outcome:
    """Run `program` in the sandbox (module doc). `audit_hook=False` leaves only the OS boundary: tests use it
    to show that the namespaces, not the hook, contain a hostile program."""
    bwrap = _bwrap()  # raises SandboxUnavailable: nothing runs outside the boundary
    start = time.monotonic()
    nonce = secrets.token_hex(16).encode()
    try:
        with ExitStack() as stack:
            # Unnamed files (O_TMPFILE or unlinked at once): nothing on disk even if the evaluator is killed.
            src, out, err, token, refusals = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(5))
            src.write(program.encode("utf-8"))
            src.flush()
            src.seek(0)
            fds = {"program": src.fileno(), "nonce": _pipe_with(nonce, stack), "token": token.fileno(),
                   "refusals": refusals.fileno()}
            bpf = sandbox_seccomp.program()
            if bpf is not None:
                fds["seccomp"] = _pipe_with(bpf, stack)
            argv = _argv(bwrap, fds, memory_mb, max(1, int(timeout + 0.999)), audit_hook)
            proc = subprocess.Popen(argv, env=_ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=tuple(fds.values()), start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # bwrap and its init share this group; the init's death empties the PID namespace
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
            token.seek(0)
            token_ok = hmac.compare_digest(token.read(256), nonce)
            stderr, refusal = _tail(err), _tail(refusals, 1024)
        return _verdict(rc, timed_out, token_ok, stderr, refusal, timeout, time.monotonic() - start)
    except Exception as e:  # the sandbox itself broke, not the program
        return Outcome(False, "error", _short(f"{type(e).__name__}: {e}"), time.monotonic() - start)


def _verdict(rc: int, timed_out: bool, token_ok: bool, stderr: str, refusal: str, timeout: float,
             seconds: float) -> Outcome:
    # bwrap exits with the program's exit code, or 128 + the signal that killed it; -N is bwrap itself killed
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else None
    if refusal or rc == REFUSED:
        return Outcome(False, "refused", _short(refusal.splitlines()[0] if refusal else stderr), seconds)
    if timed_out or sig == signal.SIGXCPU:
        why = f"killed after {timeout:g} s wall clock" if timed_out else "CPU time limit"
        return Outcome(False, "timeout", _short(f"{why}; {stderr}" if stderr else why), seconds)
    if token_ok and rc == 0:
        return Outcome(True, "passed", _short(stderr), seconds)
    if rc == SETUP_FAILED or (rc == 1 and stderr.startswith("bwrap:")):
        return Outcome(False, "error", _short(stderr), seconds)
    if "MemoryError" in stderr[-DETAIL_CHARS * 2:]:
        return Outcome(False, "memory", _short(stderr), seconds)
    if sig == signal.SIGXFSZ:
        return Outcome(False, "failed", f"output or file over {FSIZE_BYTES >> 20} MB", seconds)
    if rc == 0:
        why = "exit code 0 without the harness's completion token (the program ended before its checks returned)"
    else:
        why = f"killed by signal {sig}" if sig else f"exit code {rc}"
    return Outcome(False, "failed", _short(f"{why}; {stderr}" if stderr else why), seconds)
