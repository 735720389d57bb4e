from datetime import datetime, timedelta, timezone

from artifacts import catalog, ledger
from artifacts.manifest import Manifest
from artifacts.store import Store


def _row(run, stage, hit, seconds, device="cpu", devices=1, price=0.0, metrics=None, status="completed"):
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return ledger.LedgerRow(
        run_id=run, stage=stage, key=stage * 3, cache_hit=hit, start=start.isoformat(),
        end=(start + timedelta(seconds=seconds)).isoformat(), wall_seconds=seconds, device_type=device,
        devices=devices, nodes=1, price_per_device_hour=price, metrics=metrics or {}, status=status, preset="tiny",
    )


def test_empty_store_has_empty_tables(tmp_path):
    con = catalog.connect(Store(str(tmp_path)))
    for table in ("artifacts", "stage_runs", "runs", "evals"):
        assert con.execute(f"select count(*) from {table}").fetchone()[0] == 0


def test_ledger_rows_and_run_triple(tmp_path):
    store = Store(str(tmp_path))
    ledger.record_run(store, "r1", {"preset": "d20", "started": "2026-01-01T00:00:00+00:00", "host": "h", "config": {}})
    ledger.append(store, _row("r1", "data", False, 600.0))
    ledger.append(store, _row("r1", "base", False, 3 * 3600.0, device="H100", devices=8, price=3.0, metrics={"val_bpb": 0.81}))
    ledger.append(store, _row("r1", "base_eval", False, 360.0, device="H100", devices=8, price=3.0, metrics={"score": 0.22}))
    ledger.append(store, _row("r2", "data", True, 0.2))
    con = catalog.connect(store)
    rows = con.execute("select stage, cache_hit, round(cost_usd, 2) from stage_runs where run_id = 'r1' order by start, stage").fetchall()
    assert sorted(rows) == sorted([("data", False, 0.0), ("base", False, 72.0), ("base_eval", False, 2.4)])
    r1 = con.execute("select preset, round(cost_usd, 2), wall_seconds, final_score, cache_hits from runs where run_id='r1'").fetchone()
    assert r1 == ("d20", 74.4, 600.0 + 3 * 3600 + 360, 0.22, 0)
    r2 = con.execute("select cost_usd, cache_hits, final_score from runs where run_id='r2'").fetchone()
    assert r2 == (0.0, 1, None)
    assert con.execute("select metrics->>'val_bpb' from stage_runs where stage='base'").fetchone()[0] == "0.81"


def test_artifacts_table_reads_manifests(tmp_path):
    store = Store(str(tmp_path))
    with store.staging("k" * 64) as tmp:
        (tmp / "f").write_bytes(b"abc")
        store.commit(tmp, Manifest(key="k" * 64, kind="tokenizer", stage="tokenizer", config={"vocab_size": 512},
                                   parents={"data": "d" * 64}, code={}, metrics={"vocab_size": 512}))
    con = catalog.connect(store)
    assert con.execute("select kind, config->>'vocab_size', parents->>'data' from artifacts").fetchone() == ("tokenizer", "512", "d" * 64)


def test_failed_rows_are_costed(tmp_path):
    store = Store(str(tmp_path))
    ledger.append(store, _row("r3", "base", False, 1800.0, device="H100", devices=8, price=3.0, status="failed"))
    con = catalog.connect(store)
    assert con.execute("select failures, cost_usd from runs").fetchone() == (1, 12.0)


def test_evals_table_reads_each_eval_artifacts_rows(tmp_path):
    import json

    store = Store(str(tmp_path))
    rows = [{"suite": "CORE-2 (partial)", "task": "copa", "metric": "centered", "value": 0.1, "n": 40, "status": "ok"},
            {"suite": "CORE-2 (partial)", "task": "squad", "metric": "centered", "value": None, "n": None,
             "status": "not run: data unavailable"}]
    for key, stage, body in (("a" * 64, "base_eval", rows), ("b" * 64, "tokenizer", None)):
        with store.staging(key) as tmp:
            if body is not None:
                (tmp / "evals.json").write_text(json.dumps(body))
            store.commit(tmp, Manifest(key=key, kind="eval", stage=stage, config={}, parents={}, code={}, metrics={}, wall_seconds=1.0))
    con = catalog.connect(store)
    got = con.execute("select key, stage, suite, task, metric, value, n, status from evals order by task").fetchall()
    assert got == [("a" * 64, "base_eval", "CORE-2 (partial)", "copa", "centered", 0.1, 40, "ok"),
                   ("a" * 64, "base_eval", "CORE-2 (partial)", "squad", "centered", None, None, "not run: data unavailable")]
