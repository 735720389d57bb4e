"""The dashboard's queries on their own: the Pareto frontier, the filters, curve files, config flattening, and
the per-run queries on a small store written with the ledger's and store's own APIs (no runs needed)."""
from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone

import pandas as pd
import pytest

from artifacts import ledger
from artifacts.catalog import connect
from artifacts.manifest import Manifest
from artifacts.store import Store
from dashboards import queries


def runs_frame(rows: list[tuple]) -> pd.DataFrame:
    """(run_id, cost, score, score_name[, preset, device_types, started]) → a DataFrame shaped like queries.runs."""
    cols = ["run_id", "cost_usd", "score", "score_name", "preset", "device_types", "started"]
    full = [r + (None,) * (len(cols) - len(r)) for r in rows]
    return pd.DataFrame(full, columns=cols)


def test_frontier_keeps_the_runs_nothing_beats_per_score_name():
    df = runs_frame([
        ("cheap", 1.0, 0.10, "CORE"), ("dominated", 2.0, 0.09, "CORE"), ("better", 3.0, 0.20, "CORE"),
        ("tie-worse", 3.0, 0.15, "CORE"), ("best", 10.0, 0.30, "CORE"), ("pricey-worse", 12.0, 0.25, "CORE"),
        ("chat", 50.0, 0.05, "ChatCORE"), ("unscored", 0.0, None, None),
    ])
    front = queries.frontier(df)
    assert list(front["run_id"]) == ["cheap", "better", "best", "chat"]  # per name: ChatCORE is not on CORE's scale
    assert list(front["cost_usd"]) == sorted(front["cost_usd"])


def test_frontier_of_equal_runs_keeps_one_and_of_nothing_is_empty():
    df = runs_frame([("a", 0.0, 0.5, "CORE"), ("b", 0.0, 0.5, "CORE")])
    assert len(queries.frontier(df)) == 1
    assert queries.frontier(runs_frame([("x", 1.0, None, None)])).empty


def test_filters_by_preset_device_and_date():
    day = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    df = runs_frame([
        ("a", 1.0, 0.1, "CORE", "tiny", ["cpu"], day),
        ("b", 9.0, 0.2, "CORE", "d20", ["H100", "cpu"], day + timedelta(days=2)),
        ("c", 0.0, 0.2, "CORE", "d20", None, day + timedelta(days=5)),  # all cache hits: no device
    ])
    assert queries.device_types(df) == ["H100", "cpu"]
    assert list(queries.filter_runs(df, presets=["d20"])["run_id"]) == ["b", "c"]
    assert list(queries.filter_runs(df, device_types=["H100"])["run_id"]) == ["b"]
    assert list(queries.filter_runs(df, dates=(date(2026, 3, 1), date(2026, 3, 3)))["run_id"]) == ["a", "b"]
    assert list(queries.filter_runs(df)["run_id"]) == ["a", "b", "c"]


def test_curve_points_read_every_training_layout():
    base = {"train": {"step": [1, 2], "train_loss": [5.0, 4.0], "lr_mult": [1, 1]}, "val": [{"step": 0, "val_bpb": 3.0}]}
    mid = {"train": {"step": [1], "train_loss": [3.0]}, "val": [{"step": 1, "val_loss": 2.5, "val_bpb": None}]}
    rl = {"algorithm": "reinforce", "train": {"step": [1, 2], "mean_reward": [0.0, 0.5], "loss": [1.0, 0.9]},
          "eval": [{"step": 2, "problems": 4, "pass@1": 0.25, "pass@2": 0.5}]}
    assert queries.curve_points("base", base) == [("base", "train loss", 1, 5.0), ("base", "train loss", 2, 4.0),
                                                   ("base", "val bpb", 0, 3.0)]
    assert queries.curve_points("mid", mid) == [("mid", "train loss", 1, 3.0), ("mid", "val loss", 1, 2.5)]
    assert queries.curve_points("rl", rl) == [("rl", "mean reward", 1, 0.0), ("rl", "mean reward", 2, 0.5),
                                              ("rl", "pass@1", 2, 0.25), ("rl", "pass@2", 2, 0.5)]
    assert queries.curve_points("x", ["not", "a", "curve"]) == []


def test_flatten_names_nested_settings_and_keeps_lists_whole():
    cfg = {"base": {"depth": 4, "opt": {"lr": 0.02}}, "data": {"sources": [{"kind": "local"}]}, "empty": {}}
    assert queries.flatten(cfg) == {"base.depth": 4, "base.opt.lr": 0.02, "data.sources": [{"kind": "local"}], "empty": {}}


@pytest.fixture
def small_store(tmp_path):
    """Two runs written with the project's own ledger and store code: run A computes data (and fails tokenizer
    once, then computes it), run B hits both caches."""
    store = Store(str(tmp_path / "store"))
    t0 = datetime(2026, 5, 1, tzinfo=timezone.utc)
    keys = {"data": "d" * 64, "tokenizer": "e" * 64}
    for stage, parents in (("data", {}), ("tokenizer", {"data": keys["data"]})):
        with store.staging(keys[stage]) as tmp:
            (tmp / "curve.json").write_text(json.dumps({"train": {"step": [1], "train_loss": [2.0]}}))
            store.commit(tmp, Manifest(key=keys[stage], kind=stage, stage=stage, config={}, parents=parents,
                                       code={}, metrics={}, wall_seconds=1.0))

    def row(run, stage, minute, hit, status="completed", seconds=60.0):
        start = t0 + timedelta(minutes=minute)
        ledger.append(store, ledger.LedgerRow(
            run_id=run, stage=stage, key=keys[stage], cache_hit=hit, start=start.isoformat(),
            end=(start + timedelta(seconds=seconds)).isoformat(), wall_seconds=seconds, device_type="H100",
            devices=8, nodes=1, price_per_device_hour=3.0, status=status, preset="d20",
            error="OOM" if status == "failed" else ""))

    row("A", "data", 0, False)
    row("A", "tokenizer", 2, False, status="failed")
    row("A", "tokenizer", 4, False)
    row("B", "data", 10, True, seconds=0.5)
    row("B", "tokenizer", 11, True, seconds=0.5)
    for run, tokenizer in (("A", 1000), ("B", 2000)):
        ledger.record_run(store, run, {"preset": "d20", "started": t0.isoformat(), "host": "h",
                                       "config": {"tokenizer": {"vocab_size": tokenizer}, "report": {"run_id": run}}})
    return store, keys


def test_per_run_queries_on_a_small_store(small_store):
    store, keys = small_store
    con = connect(store)
    minute = 60 / 3600 * 8 * 3.0  # a minute on 8 H100 at $3 per device-hour
    stages = queries.stages(con, "A")
    assert list(zip(stages["stage"], stages["result"])) == [("data", "computed"), ("tokenizer", "failed"),
                                                            ("tokenizer", "computed")]
    assert list(stages["cost_usd"]) == pytest.approx([minute] * 3)
    b = queries.stages(con, "B")
    assert list(b["result"]) == ["cache hit"] * 2 and list(b["cost_usd"]) == [0, 0]
    assert list(b["saved_usd"]) == pytest.approx([minute, minute])  # a failure is not what the hit saved

    lineage = queries.lineage(con, "B")
    assert list(lineage["stage"]) == ["data", "tokenizer"] and set(lineage["computed_by"]) == {"A"}
    assert lineage["parents"][1] == {"data": keys["data"]}
    dot = queries.lineage_dot(lineage, "B")
    assert f'"{keys["data"]}" -> "{keys["tokenizer"]}"' in dot and "run A" in dot

    assert set(queries.curves(store, con, "B")["stage"]) == {"data", "tokenizer"}
    assert queries.config_diff(con, "A", "B").values.tolist() == [["tokenizer.vocab_size", "1000", "2000"]]
    cmp = queries.stage_compare(con, "A", "B").set_index("stage")
    assert cmp.loc["tokenizer", "result A"] == "computed after 1 failed" and cmp.loc["tokenizer", "result B"] == "cache hit"
    assert cmp.loc["tokenizer", "cost_usd A"] == pytest.approx(2 * minute)  # the failed attempt burned money too
    assert queries.eval_compare(con, "A", "B").empty
    assert queries.find_run(con, "A") == "A" and queries.find_run(con, "nope") is None
    assert queries.run(con, "nope") is None and queries.run(con, "B")["cache_hits"] == 2
    assert queries.checkpoints(con).empty  # no checkpoint artifact in this store
