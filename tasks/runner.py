"""The one mechanism every stage runs through: key → cache hit, or lock, compute, commit, ledger.

The store is the only cache. A stage whose key has a committed, intact artifact is a hit (cost 0);
a corrupt one is quarantined and recomputed; concurrent identical runs serialize on the key's lock,
and the second finds the first one's artifact. Compute writes into a staging directory that only
becomes visible through an atomic commit, so a crash or a bad input never leaves a trusted half.

Every attempt is in the ledger (artifacts/ledger.py): a hit found at once writes its row (cost 0); any other
attempt writes a `running` row before it waits or computes, heartbeats it from a thread of this process, and
replaces it with `completed` or `failed`. A process killed outright leaves the running row, whose stopped
heartbeat readers report as `interrupted`, charged for the time up to its last heartbeat.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from artifacts import ledger, prices
from artifacts.errors import ArtifactCorrupt
from artifacts.keys import code_fingerprint
from artifacts.manifest import Manifest
from artifacts.store import Store
from model.config import PipelineConfig

from .locks import hold
from .stage import StageContext, StageDef


@dataclass
class Outcome:
    manifest: Manifest
    cache_hit: bool
    wall_seconds: float


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@lru_cache(maxsize=1)
def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("chatforge")
    except PackageNotFoundError:
        v = "dev"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{v}+{rev}" if rev else v


def lookup(store: Store, key: str, log=print) -> Manifest | None:
    """The intact artifact under `key`, or None; a corrupt one is taken out of service."""
    try:
        return store.manifest(key)
    except ArtifactCorrupt as e:
        log(f"{e}; moving it to trash and recomputing")
        store.quarantine(key)
        return None


def execute(
    st: StageDef,
    cfg: PipelineConfig,
    store: Store,
    keys: dict[str, str],
    run_id: str,
    force: bool = False,
    log=print,
) -> Outcome:
    key = keys[st.name]
    start, t0 = _now(), time.perf_counter()
    attempt = ledger.Attempt(store, run_id, st.name, start, log=log)

    def row(cache_hit: bool, metrics: dict, device: dict, status: str = "completed", error: str = "") -> ledger.LedgerRow:
        # built-in < price file < --set cost.prices.X; the row keeps the price it used and where it came from
        price, source = prices.resolve(device["type"], cfg.cost.prices, cfg.cost.file_prices, cfg.cost.price_file)
        end = _now()
        return ledger.LedgerRow(
            run_id=run_id, stage=st.name, key=key, cache_hit=cache_hit, start=start, end=end,
            wall_seconds=round(time.perf_counter() - t0, 3), device_type=device["type"],
            devices=device["count"], nodes=device["nodes"], price_per_device_hour=price, price_source=source,
            status=status, preset=cfg.preset, error=error, metrics=metrics,
            last_heartbeat=end if status == ledger.RUNNING else "",
        )

    def hit(m: Manifest) -> Outcome:
        log(f"{st.name}: cached {key[:12]}")
        _refs(store, st, cfg, key)
        attempt.finish(row(True, m.metrics, dict(CPU)))  # a hit runs on nothing: cost 0
        return Outcome(m, True, time.perf_counter() - t0)

    m = lookup(store, key, log)
    if m is not None and not force:
        return hit(m)
    # From here the attempt may spend device time, waiting for the lock included (the node is held): its row is
    # in the ledger now, `running`, and heartbeats until the final row replaces it, so that a kill -9 still
    # leaves the attempt there (as `interrupted`), charged for the devices it expects to use.
    expected = expected_device(st, cfg)
    attempt.begin(lambda: row(False, {}, expected, status=ledger.RUNNING))
    ctx: StageContext | None = None
    try:
        # the store's lock, and Prefect's concurrency slot when several machines may compute the key (tasks/locks.py)
        waiting = lambda: log(f"{st.name}: another process is computing {key[:12]}; waiting")  # noqa: E731
        with hold(store, key, cfg.execution, on_wait=waiting, log=log):
            waited = m is None
            m = lookup(store, key, log)
            if m is not None and (not force or waited):
                return hit(m)  # someone else made it while we waited for the lock
            inputs = {name: store.local_path(keys[name]) for name in st.inputs}
            with store.staging(key) as tmp:
                ctx = StageContext(
                    inputs=inputs, out_dir=tmp, download_dir=store.local_root / "downloads",
                    wip_dir=store.wip_dir(key), log=log, device=dict(expected), store_url=store.url,
                )
                log(f"{st.name}: computing {key[:12]}")
                metrics = st.compute(st.config(cfg), ctx)
                json.dumps(metrics)  # metrics must be plain JSON before anything is committed
                m = store.commit(tmp, Manifest(
                    key=key, kind=st.kind, stage=st.name, config=st.config(cfg).key_dict(),
                    parents={name: keys[name] for name in st.inputs},
                    code={"fingerprint": code_fingerprint(st.code), "version": code_version()},
                    metrics=metrics, wall_seconds=round(time.perf_counter() - t0, 3),
                ))
        shutil.rmtree(store.wip_dir(key), ignore_errors=True)  # resume state is useless once committed
        _refs(store, st, cfg, key)
    except BaseException as e:
        # a failed stage is charged for the devices it reported before failing, else for those it expected
        device = ctx.device if ctx is not None else expected
        attempt.finish(row(False, {}, device, status="failed", error=f"{type(e).__name__}: {e}"[:500]))
        raise
    attempt.finish(row(False, metrics, ctx.device))
    return Outcome(m, False, time.perf_counter() - t0)


CPU = {"type": "cpu", "count": 1, "nodes": 1}


def expected_device(st: StageDef, cfg: PipelineConfig) -> dict:
    """What an attempt will run on, before the stage says so itself (a training child reports its device when
    it ends): what a killed or failed attempt is charged for. A stage with a `device` setting runs `nproc`
    processes, on this machine's GPUs when it may (auto, cuda) and one is visible; the others run in this
    process, on the CPU."""
    section = st.config(cfg)
    want = getattr(section, "device", None)
    if want is None:
        return dict(CPU)
    gpu = gpu_type() if want in ("auto", "cuda") else None
    return {"type": gpu or "cpu", "count": int(getattr(section, "nproc", 1) or 1), "nodes": 1}


@lru_cache(maxsize=1)
def gpu_type() -> str | None:
    """The ledger's device type of this machine's first visible GPU (`H100`, as the trainer names it), or None.
    nvidia-smi, not torch: asking CUDA would create a context on the GPU that the training child needs."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1") or not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    name = next((line.strip() for line in out.splitlines() if line.strip()), "")
    if not name:
        return None
    from model.train.runtime import PEAK_FLOPS  # the trainer's own short names (Runtime.device_type); a GPU host has torch

    return next((short for short in PEAK_FLOPS if short in name), name)


def _refs(store: Store, st: StageDef, cfg: PipelineConfig, key: str) -> None:
    store.set_ref(f"{st.name}/latest", key)
    store.set_ref(f"{st.name}/{cfg.preset}", key)
