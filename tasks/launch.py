"""Run a stage's entry point as a subprocess (one process, or torchrun for several) and stream its output.

The child gets a spec file and writes its metrics to a JSON file; its stderr/stdout lines go to the
Prefect log. Its own progress bars write whole lines every few seconds there (its stderr is a pipe, see
model/progress.py); `\\r` redraws from other libraries' bars are thinned out here. SIGTERM to us is passed
on, so the child checkpoints first.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from model.errors import InputError

_ERROR = re.compile(r"^\w+: error: (.*)$")


def launch(module: str, spec: dict, work_dir: Path, nproc: int = 1, log=print, progress_every: float = 10.0) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, metrics_path = work_dir / "spec.json", work_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "metrics_path": str(metrics_path)}, indent=1))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, str(spec_path)]
    else:
        cmd = [sys.executable, "-m", module, str(spec_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if _main_thread():
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    tail: list[str] = []
    try:
        _pump(proc, log, tail, progress_every)
        rc = proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGTERM)  # let it write a checkpoint
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if rc != 0:
        for line in reversed(tail):
            if m := _ERROR.match(line.strip()):
                raise InputError(m.group(1))
        raise RuntimeError(f"{module} exited with status {rc}; last output: {' | '.join(tail[-5:])}")
    return json.loads(metrics_path.read_text())


def _pump(proc: subprocess.Popen, log, tail: list[str], every: float) -> None:
    """Forward complete lines; `\\r` redraws (a third-party tqdm bar) are forwarded at most every `every` seconds."""
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
            log(line)
            tail.append(line)
            del tail[:-50]
    if buf.strip():
        log(buf.decode("utf-8", "replace").rstrip())
        tail.append(buf.decode("utf-8", "replace").rstrip())


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
