"""A pool of model workers for the chat server.

Each worker owns one copy of the model (on its own device: one per CUDA device, or N copies on the CPU),
one thread and one continuous batcher (`model.chat.batching`) of up to `batch_size` requests. Requests wait
in one FIFO queue; a worker with room in its batch takes the next ones between two decoding steps (their
prefill runs then, a bounded number of prompt tokens per step), and a request leaves the batch when it
ends (stop token, its max_tokens, the context, or its client going away), which frees its row at once.
Each piece of text goes to the request's asyncio queue as soon as it is decoded (thread-safe, via the
event loop), so the event loop never runs the model. Cancelling a job (the client went away) drops it from
the batch before the next step; a job cancelled while still queued is skipped. A worker is "busy" while
its batch holds any request; "active" counts the requests being decoded.
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


def _put_all(events: list[tuple[Job, tuple]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


def _emit_all(events: list[tuple[Job, tuple]]) -> None:
    """Hand many jobs' events to their event loop in one call: one wake-up per decoding step, not per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, event in events:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            for job, _ in items:
                job.cancelled.set()


@dataclass
class _Running:
    """A job in a worker's batch: its text stream and how many tokens it has produced."""

    job: Job
    text: object
    produced: int = 0


class _Worker:
    # prompt tokens prefilled between two decoding steps: bounds how long the batch stalls for newcomers
    PREFILL_TOKENS_PER_STEP = 512

    def __init__(self, index: int, device: str, artifact_dir: Path, pool: "WorkerPool", engine_factory,
                 batch_size: int):
        from model.chat.batching import Batcher
        from model.chat.engine import Engine
        from model.nn.load import load_model

        self.index, self.device, self.pool = index, device, pool
        self.model, self.tok = load_model(artifact_dir, device)
        self.engine = (engine_factory or Engine)(self.model, self.tok)
        self.batcher = Batcher(self.engine, batch_size)
        self.end_ids = {self.tok.special_id("<|assistant_end|>"), self.tok.bos_id}
        self.running: dict[int, tuple] = {}  # id(request) -> (request, _Running); read by status() and close()
        self._outbox: list[tuple[Job, tuple]] = []
        self.thread = threading.Thread(target=self._loop, name=f"chatforge-worker-{index}", daemon=True)

    @property
    def jobs(self) -> list[Job]:
        return [run.job for _, run in list(self.running.values())]

    def _loop(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        with torch.inference_mode():
            while self._admit():
                self._drop_cancelled()
                self._flush()
                if not self.running:
                    continue
                try:
                    outs = self.batcher.step()
                except Exception as e:  # a failed step answers the requests in the batch; the worker carries on
                    log.exception("generation failed on worker %d", self.index)
                    for request in self.batcher.clear():
                        self._fail(request, e)
                    outs = []
                for out in outs:
                    self._deliver(out)
                self._flush()
        self._flush()

    def _emit(self, job: Job, event: tuple) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        if self._outbox:
            events, self._outbox = self._outbox, []
            _emit_all(events)

    def _admit(self) -> bool:
        """Take queued jobs into the batch while it has room (waiting for one when it is empty); False: stop."""
        from model.chat.batching import Request
        from model.chat.streaming import TextStream

        budget = self.PREFILL_TOKENS_PER_STEP
        while self.batcher.free > 0 and budget > 0:
            self._flush()  # before waiting on the queue
            try:
                job = self.pool._queue.get() if not self.running else self.pool._queue.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                for _, run in list(self.running.values()):
                    run.job.cancel()
                self._drop_cancelled()
                return False
            if job.cancelled.is_set():  # its client left while it waited
                self.pool._count("cancelled")
                self._emit(job, ("done", "cancelled", 0))
                continue
            budget -= len(job.prompt)
            request = Request(job.prompt, job.max_tokens, job.temperature, job.top_k, job.seed)
            self.running[id(request)] = (request, _Running(job, TextStream(self.tok)))
            try:
                out = self.batcher.add(request)
            except Exception as e:
                log.exception("generation failed on worker %d", self.index)
                self._fail(request, e)
            else:
                self._deliver(out)  # its first token goes out (next flush) before the next prefill
        return True

    def _drop_cancelled(self) -> None:
        for request, run in list(self.running.values()):
            if run.job.cancelled.is_set():
                self.batcher.remove(request)
                self._finish(request, None)

    def _deliver(self, out) -> None:
        request, run = self.running[id(out.request)]
        if out.token is not None:
            run.produced += 1
            if out.token in self.end_ids:
                self._finish(request, "stop")
                return
            piece = run.text.push(out.token)
            if piece:
                self._emit(run.job, ("text", piece))
        if out.done or run.produced >= request.max_tokens:
            self._finish(request, "length")

    def _finish(self, request, reason: str | None) -> None:
        """End a request: reason "stop" or "length", or None when its client left."""
        _, run = self.running.pop(id(request))
        self.batcher.remove(request)  # a no-op when the batcher has already let it go
        if reason is None:
            self.pool._count("cancelled")
            self._emit(run.job, ("done", "cancelled", run.produced))
            return
        tail = run.text.flush()
        if tail:
            self._emit(run.job, ("text", tail))
        self.pool._count("completed")
        self._emit(run.job, ("done", reason, run.produced))

    def _fail(self, request, e: BaseException) -> None:
        # free and count before answering, so a client that saw the error sees consistent /health
        _, run = self.running.pop(id(request))
        self.batcher.remove(request)
        self.pool._count("failed")
        first = str(e).splitlines()[0] if str(e) else ""
        self._emit(run.job, ("error", f"generation failed: {type(e).__name__}: {first}"))


class WorkerPool:
    """Model workers fed from one FIFO queue. Create it in any thread; `submit` from the event loop."""

    def __init__(self, artifact_dir: str | Path, device: str | None = "cpu", workers: int | None = None,
                 max_queue: int = 256, engine_factory=None, batch_size: int = 32):
        self.artifact_dir = Path(artifact_dir)
        self.devices = plan_devices(device, workers)
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0}
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1 (got {batch_size})")
        self.workers = [_Worker(i, d, self.artifact_dir, self, engine_factory, batch_size)
                        for i, d in enumerate(self.devices)]
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
        busy = sum(bool(w.running) for w in self.workers)
        return {"total": len(self.workers), "busy": busy, "free": len(self.workers) - busy,
                "active": sum(len(w.running) for w in self.workers), "queued": self._queue.qsize(), **self.stats}

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
            for job in w.jobs:
                job.cancel()
            self._queue.put(None)
        for w in self.workers:
            w.thread.join(timeout)
