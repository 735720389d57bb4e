"""Run a stage's entry point as a subprocess (one process, or torchrun for several) and stream its output.

The child gets a spec file and writes its metrics to a JSON file; its stderr/stdout lines go to the
Prefect log. Its own progress bars write whole lines every few seconds there (its stderr is a pipe, see
model/progress.py); `\\r` redraws from other libraries' bars are thinned out here, and the metrics JSON the
entry point prints last is left out (the task logs one readable line instead).

Process hygiene, so that a stage never leaves a process behind nor hangs a worker:
- the child leads a process group of its own (a new session): a timeout, a cancel or an interrupt stops the
  whole group -- torchrun, its workers, a leaked grandchild -- with SIGTERM (a trainer checkpoints), then
  SIGKILL after a grace period; a straggler still in the group when the child exits is killed too, which
  also closes the output pipe it would otherwise hold open forever;
- being in its own session, the child would survive the death of this process (a killed worker), so it
  is started through `python -m tasks.launch --guard`, which asks Linux for SIGTERM when its parent dies
  (PR_SET_PDEATHSIG, kept across exec) and then execs the real command: it checkpoints and exits instead
  of training on, orphaned, into a staging directory nobody will commit;
- torchrun rendezvouses on a port picked free for this attempt (127.0.0.1), never a fixed one that a
  previous, killed attempt may still hold;
- success is a zero exit status *and* the metrics file the child writes last *and* the artifact files the
  stage promises (`expect`): a child that exits 0 without them did not finish.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Sequence

from model.errors import InputError

_ERROR = re.compile(r"^\w+: error: (.*)$")
# A trainer checkpoints at its next step boundary on SIGTERM: a large model's save takes a while.
GRACE_SECONDS = 120.0
# What a stage's artifact must hold for its child to have finished (besides the metrics file).
CHECKPOINT_FILES = ("model.safetensors", "model.json")  # model/train/common.py commit()
EVAL_FILES = ("report.md", "evals.json")  # model/evals/base_eval.py, chat_eval.py


class StageTimeout(InputError):
    """The stage ran past the limit its config sets (`timeout_minutes`): a config limit, so the message is one
    line naming the field to raise (and the checkpoint a rerun resumes from)."""


def launch(
    module: str,
    spec: dict,
    work_dir: Path,
    nproc: int = 1,
    log=print,
    progress_every: float = 10.0,
    *,
    timeout_minutes: float | None = None,
    limit_name: str = "timeout_minutes",
    expect: Sequence[str] = (),
    grace: float = GRACE_SECONDS,
) -> dict:
    """Run `python -m module spec.json` (torchrun when nproc > 1) and return the metrics it wrote.

    `timeout_minutes` (None: no limit) stops the whole process group; `limit_name` is the config field that set
    it, for the message. `expect`: files (relative to spec["out_dir"]) the child must have written to succeed."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, metrics_path = work_dir / "spec.json", work_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "metrics_path": str(metrics_path)}, indent=1))
    cmd = command(module, spec_path, nproc)
    if nproc > 1:
        log(f"torchrun: {nproc} processes, rendezvous at {_endpoint(cmd)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    guard = [sys.executable, "-m", "tasks.launch", "--guard", str(os.getpid()), "--"]
    proc = subprocess.Popen(guard + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main else None
    if on_main:  # a SIGTERM to us (Prefect cancel, a stopping worker) asks the child for a checkpoint
        signal.signal(signal.SIGTERM, lambda *_: _signal_group(proc.pid, signal.SIGTERM))
    watch = _Watchdog(proc, timeout_minutes * 60 if timeout_minutes else None, grace)
    tail: list[str] = []
    try:
        _pump(proc, log, tail, progress_every)
        rc = proc.wait()
    except BaseException:  # an interrupt or a cancel: let it write a checkpoint, then make sure it is gone
        _stop_group(proc, grace)
        raise
    finally:
        watch.finish()
        if previous is not None:  # None: not the main thread, or a handler Python did not install
            signal.signal(signal.SIGTERM, previous)
    if watch.timed_out:
        raise StageTimeout(
            f"{module} ran past its {timeout_minutes:g}-minute limit ({limit_name}) and was stopped (SIGTERM, then "
            f"SIGKILL after {grace:g} s): raise {limit_name}, then rerun to resume from its last checkpoint"
        )
    if rc != 0:
        for line in reversed(tail):
            if m := _ERROR.match(line.strip()):
                raise InputError(m.group(1))
        raise RuntimeError(f"{module} exited with status {rc}; last output: {' | '.join(tail[-5:])}")
    return _result(module, metrics_path, Path(spec["out_dir"]) if expect else None, expect, tail)


def command(module: str, spec_path: Path, nproc: int) -> list[str]:
    """The child's command line. Several processes: torchrun with a c10d rendezvous on 127.0.0.1 at a port that
    is free now, under a fresh id (torchrun's `--standalone` says `localhost`, which can resolve to an address
    the rendezvous store does not listen on)."""
    if nproc <= 1:
        return [sys.executable, "-m", module, str(spec_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4().hex}",
            "--local-addr=127.0.0.1", "-m", module, str(spec_path)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _endpoint(cmd: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith("--rdzv-endpoint="))


def _result(module: str, metrics_path: Path, out_dir: Path | None, expect: Sequence[str], tail: list[str]) -> dict:
    """The metrics of a child that exited 0 -- if it really finished: the metrics file is the last thing an entry
    point writes (model/train/runtime.py main), after the artifact's files."""
    last = " | ".join(tail[-5:]) or "nothing"
    try:
        metrics = json.loads(metrics_path.read_text())
    except FileNotFoundError:
        raise RuntimeError(f"{module} exited 0 but wrote no metrics ({metrics_path}): it did not finish; last output: {last}") from None
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{module} exited 0 but its metrics file {metrics_path} is not JSON ({e}): it did not finish") from None
    if not isinstance(metrics, dict):
        raise RuntimeError(f"{module} exited 0 but its metrics file {metrics_path} holds {type(metrics).__name__}, not an object")
    missing = [name for name in expect if out_dir is not None and not (out_dir / name).exists()]
    if missing:
        raise RuntimeError(f"{module} exited 0 but its artifact lacks {', '.join(missing)} (in {out_dir}): it did not finish")
    return metrics


class _Watchdog:
    """Enforces the timeout, and after the child exits kills whatever is left of its process group."""

    def __init__(self, proc: subprocess.Popen, timeout: float | None, grace: float):
        self.proc, self.timeout, self.grace = proc, timeout, grace
        self.timed_out = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"launch-watchdog-{proc.pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout if self.timeout else None
        while not self._done.is_set():
            try:
                self.proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() >= deadline:
                    self.timed_out = True
                    _stop_group(self.proc, self.grace)
        if self.proc.poll() is not None:
            # The leader exited; a grandchild still in the group (holding our pipe open) is a leak: kill it now.
            _signal_group(self.proc.pid, signal.SIGKILL)

    def finish(self) -> None:
        self._done.set()
        self._thread.join(timeout=self.grace + 10)


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the whole group (a trainer checkpoints), SIGKILL to what is left after `grace` seconds."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # unkillable (stuck in the kernel): nothing more we can do from here
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def _pump(proc: subprocess.Popen, log, tail: list[str], every: float) -> None:
    """Forward complete lines; `\\r` redraws (a third-party tqdm bar) are forwarded at most every `every` seconds;
    a line that is a JSON object (the metrics an entry point prints last) is kept out of the log."""
    buf, last_progress = b"", 0.0
    while chunk := proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096):
        buf += chunk
        parts = re.split(rb"(\r|\n)", buf)
        buf = parts.pop()  # incomplete remainder
        for text, sep in zip(parts[::2], parts[1::2]):
            line = text.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            if sep == b"\r":
                if time.monotonic() - last_progress < every:
                    continue
                last_progress = time.monotonic()
            if not _is_json_object(line):
                log(line)
            tail.append(line)
            del tail[:-50]
    if buf.strip():
        log(buf.decode("utf-8", "replace").rstrip())
        tail.append(buf.decode("utf-8", "replace").rstrip())


def _is_json_object(line: str) -> bool:
    if not (line.startswith("{") and line.endswith("}")):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _guard(argv: list[str]) -> int:
    """`python -m tasks.launch --guard PARENT_PID -- CMD...`: die with the parent (Linux), then become CMD."""
    parent, cmd = int(argv[1]), argv[3:]
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the parent died before the request took effect
        return 143
    os.execvp(cmd[0], cmd)
    return 127  # not reached: execvp replaces this process or raises


if __name__ == "__main__" and sys.argv[1:2] == ["--guard"]:
    sys.exit(_guard(sys.argv[1:]))
