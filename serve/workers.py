"""A pool of model workers for the chat server.

Each worker owns one copy of the model (on its own device: one per CUDA device, or N copies on the CPU)
and one thread. Requests wait in one FIFO queue, so they are served in arrival order by whichever worker
is free first. A worker decodes one request at a time and hands each piece of text to the request's
asyncio queue as soon as it is decoded (thread-safe, via the event loop), so the event loop never runs
the model. Cancelling a job (the client went away) stops its decoding at the next token; a job cancelled
while still queued is skipped.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

log = logging.getLogger("chatforge.serve")


class PoolBusy(Exception):
    """The queue is full: the client should retry later (HTTP 503)."""


class PoolClosed(Exception):
    """The pool is shutting down."""


def plan_devices(device: str | None, workers: int | None) -> list[str]:
    """The device of each worker. `device`: auto (CUDA if available), cpu, cuda (every visible GPU), cuda:N, mps.
    `workers`: how many model copies; default one per CUDA device, or 1 on CPU/MPS/one named GPU. With
    more workers than GPUs, workers go round-robin over the GPUs."""
    import torch

    device = (device or "auto").strip().lower()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be ≥ 1 (got {workers})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("device cuda was asked for but no CUDA device is visible: use --device cpu")
        gpus = [f"cuda:{i}" for i in range(count)]
        n = workers or count
        return [gpus[i % count] for i in range(n)]
    if device.startswith("cuda:"):
        if not torch.cuda.is_available() or int(device.split(":", 1)[1]) >= torch.cuda.device_count():
            raise ValueError(f"device {device} is not visible ({torch.cuda.device_count()} CUDA devices)")
        return [device] * (workers or 1)
    if device in ("cpu", "mps"):
        if device == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device mps was asked for but MPS is not available: use --device cpu")
        return [device] * (workers or 1)
    raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")


@dataclass
class Job:
    """One completion request: the prompt's token ids, sampling settings and the queue its events go to.

    Events: ("text", str) for each newly decoded piece, then exactly one of
    ("done", finish_reason, completion_tokens) or ("error", message)."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def stream(self) -> AsyncIterator[tuple]:
        """The job's events, ending with its "done" or "error" event."""
        while True:
            event = await self.events.get()
            yield event
            if event[0] in ("done", "error"):
                return


class _Worker:
    def __init__(self, index: int, device: str, artifact_dir: Path, pool: "WorkerPool", engine_factory):
        from model.chat.engine import Engine
        from model.nn.load import load_model

        self.index, self.device, self.pool = index, device, pool
        self.model, self.tok = load_model(artifact_dir, device)
        self.engine = (engine_factory or Engine)(self.model, self.tok)
        self.end_ids = {self.tok.special_id("<|assistant_end|>"), self.tok.bos_id}
        self.job: Job | None = None
        self.thread = threading.Thread(target=self._loop, name=f"chatforge-worker-{index}", daemon=True)

    def _loop(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        while True:
            job = self.pool._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it waited
                self.pool._count("cancelled")
                job.emit(("done", "cancelled", 0))
                continue
            self.job = job
            try:
                with torch.inference_mode():
                    self._run(job)
            except Exception as e:  # a failure answers this request only; the worker keeps serving
                log.exception("generation failed on worker %d", self.index)
                # free and count before answering, so a client that saw the error sees consistent /health
                self.job = None
                self.pool._count("failed")
                job.emit(("error", f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            finally:
                self.job = None

    def _run(self, job: Job) -> None:
        from model.chat.streaming import TextStream

        text = TextStream(self.tok)
        produced, finish = 0, "length"
        steps = self.engine.generate([job.prompt], max_tokens=job.max_tokens, temperature=job.temperature,
                                     top_k=job.top_k, seed=job.seed, num_samples=1)
        try:
            for step in steps:
                if job.cancelled.is_set():
                    finish = None
                    break
                row = step[0]
                if row is None:
                    break
                token = row[0]
                produced += 1
                if token in self.end_ids:
                    finish = "stop"
                    break
                piece = text.push(token)
                if piece:
                    job.emit(("text", piece))
                if produced >= job.max_tokens:
                    break
        finally:
            close = getattr(steps, "close", None)
            if close:
                close()
        if finish is None:
            self.pool._count("cancelled")
            job.emit(("done", "cancelled", produced))
            return
        tail = text.flush()
        if tail:
            job.emit(("text", tail))
        self.pool._count("completed")
        job.emit(("done", finish, produced))


class WorkerPool:
    """Model workers fed from one FIFO queue. Create it in any thread; `submit` from the event loop."""

    def __init__(self, artifact_dir: str | Path, device: str | None = "cpu", workers: int | None = None,
                 max_queue: int = 256, engine_factory=None):
        self.artifact_dir = Path(artifact_dir)
        self.devices = plan_devices(device, workers)
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0}
        self.workers = [_Worker(i, d, self.artifact_dir, self, engine_factory) for i, d in enumerate(self.devices)]
        first = self.workers[0]
        self.tok = first.tok
        self.sequence_len: int = first.model.config.sequence_len
        for w in self.workers:
            w.thread.start()

    # ------------------------------------------------------------ requests

    def prepare(self, messages: list[dict], max_tokens: int | None) -> tuple[list[int], int]:
        """(prompt token ids, reply budget), both inside the model's context: `fit_completion`, the rule
        `chatforge chat` follows too (older turns are dropped first). Raises `model.errors.InputError` for a
        conversation that cannot be rendered (bad role order...) or whose last user turn cannot fit."""
        from model.chat.conversation import fit_completion

        return fit_completion(messages, self.tok, self.sequence_len, max_tokens)

    def submit(self, prompt: list[int], max_tokens: int, temperature: float, top_k: int | None, seed: int) -> Job:
        """Queue a job (call from the event loop whose queue receives its events)."""
        if self._closed:
            raise PoolClosed("the server is shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise PoolBusy(f"{self._queue.qsize()} requests are already waiting: retry shortly")
        job = Job(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k or None,
                  seed=seed % (2**63), loop=asyncio.get_running_loop())
        self._queue.put(job)
        return job

    # ------------------------------------------------------------ state

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def status(self) -> dict:
        busy = sum(w.job is not None for w in self.workers)
        return {"total": len(self.workers), "busy": busy, "free": len(self.workers) - busy,
                "queued": self._queue.qsize(), **self.stats}

    @property
    def device(self) -> str:
        return ",".join(dict.fromkeys(self.devices))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers: queued jobs are dropped, the running ones are cancelled."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(("error", "the server is shutting down"))
        for w in self.workers:
            running = w.job
            if running is not None:
                running.cancel()
            self._queue.put(None)
        for w in self.workers:
            w.thread.join(timeout)
