"""Catalog speed: building the DuckDB catalog and the queries a Runs page makes, over a synthetic store.

    python bench/catalog_speed.py                   # 1,000 runs × 10 stages in a temporary store
    python bench/catalog_speed.py --runs 200 --keep /tmp/store

The store is written with the store's own API, as runs write it: one ledger row file per stage execution
(10,000), one run file per run, and the artifacts the runs computed (a manifest each, evals.json for the
eval stages: a few hundred). 30 recipes are shared by the runs, so most stage executions are cache hits,
as in a real store; 2 % of the computed ones fail first. Rows (median of --repeat, after one warm-up):
- cold `connect`: an in-memory catalog from nothing (what `artifacts query` and the run summary build);
- cold `open_catalog`: the DuckDB cache file built from nothing;
- warm reopen: `open_catalog` on the existing cache, nothing new (what a dashboard page does first);
- warm refresh: `.refresh()` on an open catalog, nothing new;
- refresh after 10 new runs (100 ledger rows, 10 run files);
- the Runs page's queries on the warm cache: every run's triple (`select * from runs order by started`,
  to a DataFrame) and the per-stage cost aggregate; and the whole page: reopen + both queries.
The target for the whole page over 1,000 runs is ≤ 2 s.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts import catalog, ledger  # noqa: E402
from artifacts.keys import artifact_key  # noqa: E402
from artifacts.manifest import Manifest  # noqa: E402
from artifacts.store import Store  # noqa: E402

# (stage, kind, on GPU, typical seconds)
STAGES = [("data", "dataset", False, 300), ("tokenizer", "tokenizer", False, 120), ("base", "checkpoint", True, 10800),
          ("base_eval", "eval", True, 600), ("mid", "checkpoint", True, 1800), ("sft", "checkpoint", True, 900),
          ("rl", "checkpoint", True, 1500), ("chat_eval_mid", "eval", True, 300), ("chat_eval_sft", "eval", True, 300),
          ("chat_eval_rl", "eval", True, 300)]
PAGE_RUNS = "SELECT * FROM runs ORDER BY started"
PAGE_STAGES = """SELECT stage, count(*) AS executions, count(*) FILTER (WHERE cache_hit) AS cache_hits,
                        sum(cost_usd) AS cost_usd, sum(saved_usd) AS saved_usd, sum(wall_seconds) / 3600 AS hours
                 FROM stage_runs GROUP BY stage ORDER BY cost_usd DESC"""


def build(store: Store, runs: int, recipes: int, seed: int = 0, first: int = 0) -> tuple[int, int]:
    """Write `runs` runs; returns (ledger rows, artifacts committed)."""
    rng = random.Random(seed)
    made: set[str] = {k for k in store.keys()}
    rows = 0
    t = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(hours=first)
    for i in range(first, first + runs):
        run_id = f"run-{i:05d}"
        recipe = rng.randrange(recipes)
        preset = ("d12", "d20", "d26")[recipe % 3]
        gpus = (1, 8, 8)[recipe % 3]
        ledger.record_run(store, run_id, {"preset": preset, "started": t.isoformat(), "host": f"node-{recipe % 7}",
                                          "config": {"recipe": recipe, "base": {"depth": 12 + recipe % 3 * 8}}})
        parent = ""
        for stage, kind, gpu, secs in STAGES:
            key = artifact_key(stage, {"recipe": recipe}, {"in": parent} if parent else {}, "bench")
            parent = key if kind == "checkpoint" else parent
            hit = key in made
            device = ("H100", gpus) if gpu else ("cpu", 1)
            metrics = _metrics(stage, rng)
            if not hit and rng.random() < 0.02:  # a failed try first (an OOM), then the stage again
                rows += _row(store, run_id, stage, key, False, t, secs * rng.uniform(0.1, 0.5), device, preset, {}, "failed")
                t += timedelta(seconds=secs * 0.3)
            wall = 0.3 if hit else secs * rng.uniform(0.8, 1.2)
            if not hit:
                _commit(store, key, stage, kind, metrics)
                made.add(key)
            rows += _row(store, run_id, stage, key, hit, t, wall, device, preset, metrics)
            t += timedelta(seconds=wall + 1)
        t += timedelta(hours=1)
    return rows, len(made)


def _metrics(stage: str, rng: random.Random) -> dict:
    if stage == "base_eval":
        return {"score_name": "CORE", "score": round(rng.uniform(0.15, 0.3), 4), "val_bpb": round(rng.uniform(0.7, 0.9), 4)}
    if stage.startswith("chat_eval"):
        return {"score_name": "ChatCORE", "score": round(rng.uniform(0.05, 0.4), 4)}
    if stage in ("base", "mid", "sft"):
        return {"val_bpb": round(rng.uniform(0.7, 1.0), 4), "steps": 1000}
    return {}


def _row(store, run_id, stage, key, hit, t, wall, device, preset, metrics, status="completed") -> int:
    ledger.append(store, ledger.LedgerRow(
        run_id=run_id, stage=stage, key=key, cache_hit=hit, start=t.isoformat(), end=(t + timedelta(seconds=wall)).isoformat(),
        wall_seconds=wall, device_type=device[0], devices=device[1], nodes=1,
        price_per_device_hour=ledger.DEFAULT_PRICES[device[0]], status=status, preset=preset, metrics=metrics))
    return 1


def _commit(store: Store, key: str, stage: str, kind: str, metrics: dict) -> None:
    with store.staging(key) as tmp:
        if kind == "eval":
            tasks = ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee"] if stage != "base_eval" else \
                [f"core_task_{j}" for j in range(22)]
            suite = "CORE" if stage == "base_eval" else "ChatCORE"
            (tmp / "evals.json").write_text(json.dumps([{"suite": suite, "task": task, "metric": "centered", "value": 0.2,
                                                          "n": 500, "status": "ok"} for task in tasks]))
        (tmp / "metrics.txt").write_text(stage)
        store.commit(tmp, Manifest(key=key, kind=kind, stage=stage, config={"stage": stage}, parents={},
                                   code={"fingerprint": "bench", "version": "bench"}, metrics=metrics, wall_seconds=1.0))


def timed(fn, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--recipes", type=int, default=30, help="distinct configs the runs share (default 30)")
    ap.add_argument("--repeat", type=int, default=5, help="median of this many timings for the warm rows (default 5)")
    ap.add_argument("--keep", metavar="DIR", help="write the store here (must not exist) and keep it")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "store"
        if root.exists():
            print(f"{root} exists: choose a new --keep directory", file=sys.stderr)
            return 2
        store = Store(str(root))
        t0 = time.perf_counter()
        rows, arts = build(store, args.runs, args.recipes)
        print(f"synthetic store: {args.runs:,} runs × {len(STAGES)} stages = {rows:,} ledger rows, {arts} artifacts "
              f"({sum(1 for _ in root.glob('artifacts/*/evals.json'))} with evals.json); written in {time.perf_counter() - t0:.1f} s")
        cache = Path(tmp) / "cache" / "catalog.duckdb"
        figures: list[tuple[str, float]] = []

        figures.append(("cold connect (in memory)", timed(lambda: catalog.connect(store))))
        figures.append(("cold open_catalog (cache file)", timed(lambda: catalog.open_catalog(store, cache).close())))
        catalog.open_catalog(store, cache).close()
        figures.append(("warm reopen, nothing new", timed(lambda: catalog.open_catalog(store, cache).close(), args.repeat)))
        cat = catalog.open_catalog(store, cache)
        figures.append(("warm refresh, nothing new", timed(cat.refresh, args.repeat)))
        build(store, 10, args.recipes, seed=1, first=args.runs)
        figures.append(("refresh after 10 new runs", timed(cat.refresh)))
        con = cat.cursor()
        n = len(con.execute(PAGE_RUNS).df())
        figures.append((f"query: runs triple ({n:,} rows → DataFrame)", timed(lambda: con.execute(PAGE_RUNS).df(), args.repeat)))
        figures.append(("query: per-stage cost aggregate", timed(lambda: con.execute(PAGE_STAGES).df(), args.repeat)))
        cat.close()

        def page() -> None:
            c = catalog.open_catalog(store, cache)
            c.con.execute(PAGE_RUNS).df()
            c.con.execute(PAGE_STAGES).df()
            c.close()

        figures.append(("Runs page: warm reopen + both queries", timed(page, args.repeat)))
        w = max(len(name) for name, _ in figures)
        for name, secs in figures:
            print(f"  {name:<{w}}  {secs * 1000:9.1f} ms")
        verdict = "meets" if figures[-1][1] <= 2.0 else "MISSES"
        print(f"Runs page over {args.runs + 10:,} runs: {figures[-1][1]:.3f} s ({verdict} the ≤ 2 s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
