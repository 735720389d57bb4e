"""Run untrusted model-generated Python (a HumanEval completion plus its unit tests) in a subprocess.

`run_program(program)` writes the program into a fresh temporary directory, runs it in a separate
interpreter and says how it ended (`Outcome.status`): "passed" (exit 0 within the limits), "failed",
"timeout", "memory", "refused" (a forbidden operation was attempted) or "error" (the sandbox itself
failed). The temporary directory is deleted afterwards, so one misbehaving program cannot spoil the
next: the evaluation simply continues.

The layers, and why each exists:

- **Subprocess, own session.** A crash, a hang or a `sys.exit` in generated code must not take the
  evaluator down. The wall-clock timeout kills the whole process group (`start_new_session=True`).
- **rlimits** (set by the bootstrap before the program runs, soft = hard): RLIMIT_CPU (a busy loop dies
  even if the wall clock were missed), RLIMIT_AS = memory_mb (`bytearray(10 * 1024**3)` raises
  MemoryError at once instead of pushing the machine into swap or the OOM killer), RLIMIT_FSIZE (no
  disk filling; stdout/stderr go to files, so this is also the cap on output floods), RLIMIT_CORE 0,
  and RLIMIT_NPROC for non-root users (root ignores it, and it counts every process of the user).
- **Isolated interpreter and scrubbed environment.** `python -I -B`: no PYTHON* variables, no user
  site, no current directory on sys.path, no bytecode written. The environment is rebuilt from scratch
  (PATH, LANG, HOME = TMPDIR = the work directory), so tokens such as HF_TOKEN never reach the child.
  stdin is /dev/null.
- **Network namespace.** When `unshare --net --map-root-user` works on this machine the child runs in
  a fresh network namespace holding only a down loopback: nothing can be reached, not even 127.0.0.1.
- **PEP 578 audit hook.** Installed by the bootstrap before the program is compiled. It refuses (raises
  PermissionError) sockets that connect/bind/resolve, process creation (fork, exec, spawn, system,
  subprocess), signals to other processes, rlimit changes, ctypes, and writes, deletes, renames and
  mode changes outside the work directory. A refusal is recorded in a file the parent reads and forces
  exit code 98, so a program that catches the PermissionError and exits 0 still does not pass.

What this does NOT protect against: this is a guard against the accidents of generated code, not a
security boundary against a determined attacker. Audit hooks are documented as unsuitable for
sandboxing: code can reach around them (`_posixsubprocess`, closing the refusal fd then `os._exit`,
C extensions, interpreter bugs). The child runs as the same user (as root, the user namespace keeps
root's file permissions), reads any file that user can read, and is not in a mount, pid or cgroup
namespace; without `unshare` the network guard is the audit hook alone. For hostile code use a
container or VM with no network and a read-only filesystem.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FSIZE_BYTES = 16 * 1024 * 1024
SETUP_FAILED, REFUSED = 97, 98  # exit codes the bootstrap reserves
DETAIL_CHARS = 300

# Runs in the child before the untrusted program. Everything lives inside _sandbox() so the program
# cannot reach the hook's state through the globals it is executed next to.
_BOOTSTRAP = r'''
import os, sys
def _sandbox():
    try:
        import reprlib, resource
        path, work, fd, mem, cpu, fsize, nproc = sys.argv[1:8]
        fd, cpu = int(fd), int(cpu)
        for name, soft, hard in (("RLIMIT_AS", int(mem), int(mem)), ("RLIMIT_CPU", cpu, cpu + 1),
                                 ("RLIMIT_FSIZE", int(fsize), int(fsize)), ("RLIMIT_CORE", 0, 0),
                                 ("RLIMIT_NPROC", int(nproc), int(nproc))):
            if soft >= 0:
                resource.setrlimit(getattr(resource, name), (soft, hard))
        source = open(path, encoding="utf-8").read()
    except BaseException as e:
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
        os._exit(97)
    work = os.path.realpath(work)
    writes = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    never = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg",
             "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname",
             "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
             "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
             "resource.prlimit"}
    # event -> (index of a path argument, index of its dir_fd argument or None)
    paths = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
             "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.truncate": ((0, None),),
             "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.mkdir": ((0, 2),),
             "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),)}
    refused = []

    def inside(p, dir_fd=None):
        try:  # an fd, or a path relative to a dir_fd, is resolved through /proc/self/fd
            p = f"/proc/self/fd/{p}" if isinstance(p, int) else os.fsdecode(os.fspath(p))
            if isinstance(dir_fd, int) and dir_fd >= 0:
                p = os.path.join(f"/proc/self/fd/{dir_fd}", p)
            p = os.path.realpath(p)
        except (OSError, TypeError, ValueError):
            return False
        return p == work or p.startswith(work + os.sep)

    def forbidden(event, args):
        if event in never:
            return True
        if event.startswith("ctypes."):  # numpy's import dlopens the main program; allow only that
            return not (event == "ctypes.dlopen" and args[0] is None)
        if event == "open":
            p, mode, flags = args
            return (bool(flags & writes) and not isinstance(p, int) and p not in (os.devnull, b"/dev/null")
                    and not inside(p))
        return any(not inside(args[i], None if d is None else args[d]) for i, d in paths.get(event, ()))

    def hook(event, args):
        if forbidden(event, args):
            refused.append(event)
            try:
                os.write(fd, f"refused {event}{reprlib.repr(args)}"[:400].encode() + b"\n")
            except OSError:
                pass
            raise PermissionError(f"sandbox refused {event}")

    sys.dont_write_bytecode = True
    sys.argv = [path]
    sys.addaudithook(hook)
    try:
        exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path,
                                             "__builtins__": __builtins__})
    except SystemExit:
        raise
    except BaseException as e:  # the report should show the program's frames, not the bootstrap's
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)
    finally:
        if refused:  # also when the program swallowed the PermissionError and exits 0
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(98)
_sandbox()
'''


@dataclass(frozen=True)
class Outcome:
    passed: bool  # the program exited 0 within the limits
    status: str  # "passed" | "failed" | "timeout" | "memory" | "refused" | "error"
    detail: str  # last line(s) of stderr, at most ~300 chars, for reports
    seconds: float


@functools.lru_cache(maxsize=1)
def _unshare() -> tuple[str, ...]:
    """The command prefix that puts the child in a fresh network namespace, or () where that fails."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    prefix = (exe, "--net", "--map-root-user")
    try:
        ok = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return prefix if ok else ()


def _nproc_limit() -> int:
    """RLIMIT_NPROC counts every task of the real user, so the limit is what runs now plus headroom;
    root ignores the limit, so it is not set there (-1)."""
    if os.getuid() == 0:
        return -1
    tasks = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == os.getuid():
                tasks += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return tasks + 64


def isolation() -> dict:
    """The protections active on this machine, for the evaluation report."""
    rlimits = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_CORE"]
    if os.getuid() != 0:
        rlimits.append("RLIMIT_NPROC")
    return {"network_namespace": bool(_unshare()), "audit_hook": hasattr(sys, "addaudithook"),
            "rlimits": rlimits, "isolated_interpreter": True, "scrubbed_env": True,
            "process_group_kill": True, "fsize_bytes": FSIZE_BYTES}


def _tail(path: Path, limit: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
        return f.read().decode("utf-8", "replace").strip()


def _short(text: str) -> str:
    return text[-DETAIL_CHARS:]


def _remove(root: str) -> None:
    def unlock(func, path, _exc) -> None:  # a program may chmod 000 a directory of its own
        os.chmod(os.path.dirname(path), 0o700)
        func(path)
    shutil.rmtree(root, onerror=unlock)


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> Outcome:
    """Run `program` in the sandbox; see the module docstring for the limits and what they guard."""
    start = time.monotonic()
    root = tempfile.mkdtemp(prefix="chatforge-sandbox-")
    try:
        base = Path(root)
        work = base / "work"  # cwd and HOME; the only place the program may write
        work.mkdir()
        (base / "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
               "TMPDIR": str(work), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err, \
                open(base / "refusals", "wb") as refusals:
            argv = [*_unshare(), sys.executable, "-I", "-B", "-c", _BOOTSTRAP, str(base / "program.py"),
                    str(work), str(refusals.fileno()), str(memory_mb * 1024 * 1024),
                    str(max(1, int(timeout + 0.999))), str(FSIZE_BYTES), str(_nproc_limit())]
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, pass_fds=(refusals.fileno(),), start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # also reaps anything the program left behind in its group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
        seconds = time.monotonic() - start
        stderr, refusal = _tail(base / "stderr"), _tail(base / "refusals", 1024)
        if refusal or rc == REFUSED:
            return Outcome(False, "refused", _short(refusal.splitlines()[0] if refusal else stderr), seconds)
        if timed_out or rc == -signal.SIGXCPU:
            why = f"killed after {timeout:g} s wall clock" if timed_out else "CPU time limit"
            return Outcome(False, "timeout", _short(f"{why}; {stderr}" if stderr else why), seconds)
        if rc == 0:
            return Outcome(True, "passed", _short(stderr), seconds)
        if rc == SETUP_FAILED:
            return Outcome(False, "error", _short(stderr), seconds)
        if "MemoryError" in stderr[-DETAIL_CHARS * 2:]:
            return Outcome(False, "memory", _short(stderr), seconds)
        if rc == -signal.SIGXFSZ:
            return Outcome(False, "failed", f"output or file over {FSIZE_BYTES >> 20} MB", seconds)
        why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        return Outcome(False, "failed", _short(f"{why}; {stderr}" if stderr else why), seconds)
    except Exception as e:  # the sandbox itself broke, not the program
        return Outcome(False, "error", _short(f"{type(e).__name__}: {e}"), time.monotonic() - start)
    finally:
        try:
            _remove(root)
        except OSError:
            shutil.rmtree(root, ignore_errors=True)
