"""The HumanEval sandbox's inner side: the bootstrap that runs inside bubblewrap before the untrusted program.

model/evals/sandbox.py reads this file and hands its text to `python -I -B -c`; it is never imported (the
work is guarded by `__name__ == "__main__"`, which a `-c` run is). It lives in a file of its own so that it
reads, lints and diffs as code.

In order, it: reads the per-run nonce from its pipe and closes the pipe; sets the rlimits; installs the
PEP 578 audit hook (defence in depth only: the boundary is the namespaces around this process); runs the
program; and only when the program's top-level code, which ends with the task's `check(...)` call,
has returned without raising, writes the nonce to the token fd and exits 0 at once. Whatever else ends
the program (`sys.exit(0)`, `os._exit(0)`, a signal, a closed token fd, a refusal it swallowed) leaves
the token unwritten, and the evaluator does not count the program as passed.

Arguments: program path, work directory, nonce fd, token fd, refusal fd, RLIMIT_AS bytes, RLIMIT_CPU
seconds, RLIMIT_FSIZE bytes, RLIMIT_NPROC (-1: unset), audit hook on (1) or off (0, tests only).
"""
import os
import sys


def _sandbox():
    try:
        import reprlib
        import resource
        path, work, nonce_fd, token_fd, refusal_fd, mem, cpu, fsize, nproc, audit = sys.argv[1:11]
        nonce_fd, token_fd, refusal_fd, cpu = int(nonce_fd), int(token_fd), int(refusal_fd), int(cpu)
        # The nonce leaves the pipe now, so the program finds no fd to read it from; from here on it is
        # only this frame's local. A program that walks the frame stack can still take it: see the threat
        # model in sandbox.py.
        nonce = os.read(nonce_fd, 256)
        os.close(nonce_fd)
        for name, soft, hard in (("RLIMIT_AS", int(mem), int(mem)), ("RLIMIT_CPU", cpu, cpu + 1),
                                 ("RLIMIT_FSIZE", int(fsize), int(fsize)), ("RLIMIT_CORE", 0, 0),
                                 ("RLIMIT_NPROC", int(nproc), int(nproc))):
            if soft >= 0:
                resource.setrlimit(getattr(resource, name), (soft, hard))
        with open(path, encoding="utf-8") as f:
            source = f.read()
        if len(nonce) < 16:
            raise ValueError("the nonce pipe was empty")
    except BaseException as e:
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
        os._exit(97)
    work = os.path.realpath(work)
    writes = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    never = {"socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg",
             "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname",
             "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
             "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
             "resource.prlimit",
             # the shortest roads to this frame's nonce; walking frame.f_back is not audited, so this
             # only raises the bar (see the threat model)
             "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames"}
    # event -> (index of a path argument, index of its dir_fd argument or None)
    paths = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
             "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.truncate": ((0, None),),
             "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.mkdir": ((0, 2),),
             "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
             "sqlite3.connect": ((0, None),)}
    harness_frames = (sys._getframe(0), sys._getframe(0).f_back)
    refused = []

    def inside(p, dir_fd=None):
        try:  # an fd, or a path relative to a dir_fd, is resolved through /proc/self/fd where there is one
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
        if event == "sys._getframe":
            return any(args[0] is f for f in harness_frames)
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
                os.write(refusal_fd, f"refused {event}{reprlib.repr(args)}"[:400].encode() + b"\n")
            except OSError:
                pass
            raise PermissionError(f"sandbox refused {event}")

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass

    sys.dont_write_bytecode = True
    sys.argv = [path]
    if audit == "1":
        sys.addaudithook(hook)
    try:
        exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path,
                                             "__builtins__": __builtins__})
    except SystemExit:  # the program's own exit, whatever its code: the checks did not finish, no token
        raise
    except BaseException as e:  # the report should show the program's frames, not the bootstrap's
        import traceback
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)
    finally:
        if refused:  # also when the program swallowed the PermissionError and exits 0
            flush()
            os._exit(98)
    # Reached only when the program's top-level code, ending in the task's check(...), returned.
    flush()
    try:
        os.write(token_fd, nonce)
    except OSError:  # the program closed or replaced the fd: no token, so no pass
        os._exit(1)
    os._exit(0)  # at once: no atexit handler or lingering thread of the program runs after the token


if __name__ == "__main__":
    _sandbox()
