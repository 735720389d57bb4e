"""tasks/runner.py writes every attempt into the ledger: `running` with heartbeats while it works, replaced at the
same path by `completed` or `failed`; a cache hit found at once is one `completed` row; and a stage killed with -9
stays in the ledger, reported `interrupted` with the device time up to its last heartbeat, in the run's dollars."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from artifacts import catalog, ledger
from artifacts.store import Store
from flows.overrides import build_config
from helpers import sets_for, write_corpus
from tasks import runner
from tasks.registry import STAGES, get
from tasks.runner import execute
from tasks.stage import StageDef, plan

ROOT = Path(__file__).resolve().parents[2]


def _rows(store: Store, run: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(store.root, "ledger", run).glob("*.json"))]


def _stage(name: str, compute, section: str = "decontam") -> StageDef:
    return StageDef(name=name, kind="report", section=section, inputs=(), code=("tasks.runner",), compute=compute)


def test_a_computed_stage_is_running_with_heartbeats_then_completed_in_one_row(tmp_path, monkeypatch):
    monkeypatch.setenv(ledger.HEARTBEAT_ENV, "0.05")
    store, cfg = Store(str(tmp_path / "store")), build_config("tiny")
    seen: list[dict] = []

    def compute(_cfg, ctx):
        # what a reader sees while the stage works: its attempt, running, its wall growing with each heartbeat
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len({r["last_heartbeat"] for r in seen}) < 3:
            seen.extend(_rows(store, "run-1"))
            time.sleep(0.02)
        (ctx.out_dir / "out.txt").write_text("x")
        return {"made": 1}

    st = _stage("work", compute)
    out = execute(st, cfg, store, plan([st], cfg), "run-1", log=lambda m: None)
    assert not out.cache_hit
    assert seen and {r["status"] for r in seen} == {"running"} and {r["cache_hit"] for r in seen} == {False}
    assert len({r["last_heartbeat"] for r in seen}) >= 3 and all(r["end"] == r["last_heartbeat"] for r in seen)
    assert seen[-1]["wall_seconds"] > seen[0]["wall_seconds"]
    (final,) = _rows(store, "run-1")  # the final row replaced the running one: one row per attempt
    assert final["status"] == "completed" and final["metrics"] == {"made": 1} and "last_heartbeat" not in final
    assert final["wall_seconds"] >= seen[-1]["wall_seconds"]

    again = execute(st, cfg, store, plan([st], cfg), "run-2", log=lambda m: None)  # a hit: one row, cost 0
    assert again.cache_hit
    (hit,) = _rows(store, "run-2")
    assert hit["status"] == "completed" and hit["cache_hit"] and hit["cost_usd"] == 0.0


def test_a_failed_stage_replaces_its_running_row_charged_for_the_devices_it_expected(tmp_path, monkeypatch):
    monkeypatch.setenv(ledger.HEARTBEAT_ENV, "0.05")
    store = Store(str(tmp_path / "store"))
    cfg = build_config("tiny", ["base.nproc=2", "base.device=cpu", "cost.prices.cpu=1.0"])

    def compute(_cfg, ctx):
        time.sleep(0.2)  # a few heartbeats
        raise RuntimeError("the child exited with status 1")  # before it reported its devices

    st = _stage("train", compute, section="base")
    with pytest.raises(RuntimeError):
        execute(st, cfg, store, plan([st], cfg), "run-1", log=lambda m: None)
    time.sleep(0.15)  # a late heartbeat would come now: none may
    (row,) = _rows(store, "run-1")
    assert row["status"] == "failed" and row["error"] == "RuntimeError: the child exited with status 1"
    # base.nproc processes on the CPU: what the attempt expected to run on, at the price it resolved
    assert (row["device_type"], row["devices"], row["nodes"], row["price_source"]) == ("cpu", 2, 1, "--set cost.prices.cpu")
    assert row["wall_seconds"] >= 0.2 and row["cost_usd"] == pytest.approx(row["wall_seconds"] / 3600 * 2)


def test_expected_device_follows_the_stage_settings(monkeypatch):
    cfg = build_config("tiny", ["base.nproc=2", "base.device=cpu"])
    assert runner.expected_device(get("base"), cfg) == {"type": "cpu", "count": 2, "nodes": 1}
    assert runner.expected_device(get("tokenizer"), cfg) == {"type": "cpu", "count": 1, "nodes": 1}  # in process
    runner.gpu_type.cache_clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: auto trains on the CPU
    try:
        assert runner.gpu_type() is None
        auto = build_config("tiny", ["base.nproc=2", "base.device=auto"])
        assert runner.expected_device(get("base"), auto) == {"type": "cpu", "count": 2, "nodes": 1}
    finally:
        runner.gpu_type.cache_clear()


# ---------------------------------------------------------------- kill -9 mid-base, for real

KILLED = "run-killed"
BASE_SETS = ["base.num_iterations=2000", "base.checkpoint_every=2", "base.eval_every=2000", "base.sample_every=2000",
             "cost.prices.cpu=1.0"]
CHILD = """
import json, sys
from artifacts.store import Store
from flows.overrides import build_config
from tasks.registry import STAGES, get
from tasks.runner import execute
from tasks.stage import plan

cfg = build_config("tiny", json.loads(sys.argv[2]))
execute(get("base"), cfg, Store(sys.argv[1]), plan(STAGES, cfg), sys.argv[3])
"""


def _pids_mentioning(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and text.encode() in (p / "cmdline").read_bytes():
                out.append(int(p.name))
        except OSError:
            pass
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc as on Linux")
def test_kill_9_mid_base_leaves_an_interrupted_attempt_counted_in_the_run_cost(tmp_path, monkeypatch):
    monkeypatch.setenv(ledger.HEARTBEAT_ENV, "0.5")  # the stage's process inherits it; this reader uses it too
    corpus = write_corpus(tmp_path / "docs.jsonl", docs=3000)
    sets = [a for a in sets_for(corpus) if a != "--set"] + BASE_SETS
    cfg, store = build_config("tiny", sets), Store(str(tmp_path / "store"))
    keys = plan(STAGES, cfg)
    for name in ("data", "tokenizer"):  # base's inputs, in this process
        execute(get(name), cfg, store, keys, "prep", log=lambda m: None)

    log = open(tmp_path / "base.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, store.root, json.dumps(sets), KILLED], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wip = Path(store.root, "wip", keys["base"])
    deadline = time.time() + 240
    while not any(wip.glob("step-*")):  # mid-base: after its first checkpoint
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        assert time.time() < deadline, "base never wrote a checkpoint"
        time.sleep(0.02)
    time.sleep(1.2)  # a couple more heartbeats into training
    killed_at = datetime.now(timezone.utc)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage's process and its group: no handler runs, no final row
    proc.wait()
    # the trainer (its own session) is told by its guard that its parent died: it checkpoints and exits
    deadline = time.time() + 120
    while _pids_mentioning(str(wip)) and time.time() < deadline:
        time.sleep(0.1)
    assert not _pids_mentioning(str(wip)), "the training child outlived its killed stage"
    assert store.manifest(keys["base"]) is None  # nothing committed

    (raw,) = _rows(store, KILLED)  # the attempt is in the ledger: its running row, as its last heartbeat left it
    assert raw["status"] == "running"
    con = catalog.connect(store)
    deadline = time.time() + 10  # three heartbeats after the last one it is interrupted
    while con.execute("select status from stage_runs where run_id = ?", [KILLED]).fetchone()[0] != "interrupted":
        assert time.time() < deadline, "the killed attempt never showed as interrupted"
        time.sleep(0.2)
        con = catalog.connect(store)
    row = con.execute("""select stage, cache_hit, start, "end", wall_seconds, device_type, devices, device_hours,
                                price_per_device_hour, price_source, cost_usd
                         from stage_runs where run_id = ?""", [KILLED]).fetchone()
    stage, hit, start, end, wall, dev, devices, dev_hours, price, source, cost = row
    assert (stage, hit, dev, devices, price, source) == ("base", False, "cpu", 1, 1.0, "--set cost.prices.cpu")
    # the device time up to its last heartbeat: at least the second or so it trained after the checkpoint, and
    # lost no more than about a heartbeat before the kill
    assert wall >= 1.0 and wall == pytest.approx((end - start).total_seconds(), abs=0.1)
    assert (killed_at - end).total_seconds() < 0.5 + 1.0
    assert dev_hours == pytest.approx(wall / 3600) and dev_hours > 0 and cost == pytest.approx(dev_hours * 1.0)
    run_cost, run_hours, interrupted, running = con.execute(
        "select cost_usd, device_hours, interrupted, running from runs where run_id = ?", [KILLED]).fetchone()
    assert (run_cost, run_hours, interrupted, running) == (pytest.approx(cost), pytest.approx(dev_hours), 1, 0)
