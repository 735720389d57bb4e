"""The DuckDB catalog: tables and the cost / time / score triple on hand-made ledger rows, unreadable files
skipped and listed, the incremental file cache, export, and one-line query errors."""
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import duckdb
import pytest

from artifacts import catalog, catalog_files, ledger
from artifacts.manifest import Manifest
from artifacts.store import Store

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _row(run, stage, hit, seconds, at=0.0, device="cpu", devices=1, price=0.0, metrics=None, status="completed",
         key=None, source="built-in"):
    start = T0 + timedelta(seconds=at)
    return ledger.LedgerRow(
        run_id=run, stage=stage, key=key or stage * 3, cache_hit=hit, start=start.isoformat(),
        end=(start + timedelta(seconds=seconds)).isoformat(), wall_seconds=seconds, device_type=device,
        devices=devices, nodes=1, price_per_device_hour=price, price_source=source, metrics=metrics or {},
        status=status, preset="tiny",
    )


def _commit(store, key, stage="tokenizer", kind="tokenizer", files=None, metrics=None):
    with store.staging(key) as tmp:
        for rel, body in (files or {"f": "abc"}).items():
            (tmp / rel).write_text(body if isinstance(body, str) else json.dumps(body))
        store.commit(tmp, Manifest(key=key, kind=kind, stage=stage, config={"vocab_size": 512}, parents={"data": "d" * 64},
                                   code={}, metrics=metrics or {}, wall_seconds=1.0))


CORE = {"score_name": "CORE-18 (partial)", "score": 0.22, "val_bpb": 0.81}


def _chat(name, score):
    return {"score_name": name, "score": score}


@pytest.fixture
def runs_store(tmp_path):
    """r1: a d20 run on 8×H100 with a failed try, evals of every chat model; r2: all cache hits of r1;
    r3: an rl eval that did not run; r4: only chat_eval_base."""
    store = Store(str(tmp_path / "store"))
    ledger.record_run(store, "r1", {"preset": "d20", "started": T0.isoformat(), "host": "gpu-node", "config": {}})
    h100 = dict(device="H100", devices=8, price=3.0)
    for r in [_row("r1", "data", False, 600.0, at=0),
              _row("r1", "base", False, 1800.0, at=700, status="failed", **h100),          # $12, burned, not a result
              _row("r1", "base", False, 3 * 3600.0, at=2600, source="file:/p.toml", **h100),  # $72
              _row("r1", "base_eval", False, 360.0, at=13500, metrics=CORE, **h100),        # $2.40
              _row("r1", "chat_eval_base", False, 60.0, at=13900, metrics=_chat("ChatCORE", 0.9)),
              _row("r1", "chat_eval_mid", False, 60.0, at=14000, metrics=_chat("ChatCORE", 0.3)),
              _row("r1", "chat_eval_sft", False, 60.0, at=14100, metrics=_chat("ChatCORE-5 (partial)", 0.35))]:
        ledger.append(store, r)
    for stage, m in (("data", {}), ("base", {}), ("base_eval", CORE)):
        ledger.append(store, _row("r2", stage, True, 0.2, at=20000, metrics=m))
    for r in [_row("r3", "base_eval", False, 10.0, metrics=CORE, key="x"),
              _row("r3", "chat_eval_sft", False, 10.0, at=20, metrics=_chat("ChatCORE", 0.4), key="y"),
              _row("r3", "chat_eval_rl", False, 10.0, at=40, metrics=_chat("ChatCORE", None), key="z"),
              _row("r4", "base_eval", False, 10.0, metrics=CORE, key="x"),
              _row("r4", "chat_eval_base", False, 10.0, at=20, metrics=_chat("ChatCORE", 0.9), key="w")]:
        ledger.append(store, r)
    return store


def test_empty_store_has_empty_tables(tmp_path):
    con = catalog.connect(Store(str(tmp_path)))
    for table in ("artifacts", "stage_runs", "runs", "evals", "run_info", "skipped"):
        assert con.execute(f"select count(*) from {table}").fetchone()[0] == 0


def test_stage_runs_keep_ledger_columns_price_source_and_saved_dollars(runs_store):
    con = catalog.connect(runs_store)
    rows = con.execute("select stage, status, cache_hit, round(cost_usd, 2), round(saved_usd, 2), price_source "
                       "from stage_runs where run_id in ('r1', 'r2') and stage in ('base', 'base_eval') order by start, stage").fetchall()
    assert rows == [("base", "failed", False, 12.0, 0.0, "built-in"), ("base", "completed", False, 72.0, 0.0, "file:/p.toml"),
                    ("base_eval", "completed", False, 2.4, 0.0, "built-in"),
                    # a hit saved what computing its key cost: the completed row, not the failed try
                    ("base", "completed", True, 0.0, 72.0, "built-in"), ("base_eval", "completed", True, 0.0, 2.4, "built-in")]
    assert con.execute("select metrics->>'val_bpb' from stage_runs where stage='base_eval' and run_id='r1'").fetchone()[0] == "0.81"


def test_runs_triple(runs_store):
    con = catalog.connect(runs_store)
    cols = ("preset, host, hardware, round(cost_usd, 2), round(saved_usd, 2), wall_clock_seconds, stage_seconds, "
            "stage_executions, cache_hits, failures, core_name, core, chat_stage, chat_name, chat_score, score_name, score")
    got = {r[0]: r[1:] for r in con.execute(f"select run_id, {cols} from runs").fetchall()}
    # r1: dollars of computed and failed rows; wall clock from the first start to the last end, beside the sum of
    # stage times; CORE of base_eval, ChatCORE of sft (the final chat model: no rl), never chat_eval_base's 0.9
    assert got["r1"] == ("d20", "gpu-node", "8×H100 + cpu", 86.4, 0.0, 14160.0, 600 + 1800 + 3 * 3600 + 360 + 180.0,
                         7, 0, 1, "CORE-18 (partial)", 0.22, "chat_eval_sft", "ChatCORE-5 (partial)", 0.35,
                         "ChatCORE-5 (partial)", 0.35)
    # r2: all cache hits: $0, the dollars they saved beside, no hardware computed anything; CORE from the hit's metrics
    assert got["r2"] == ("tiny", None, None, 0.0, 74.4, 0.2, pytest.approx(0.6), 3, 3, 0, "CORE-18 (partial)", 0.22,
                         None, None, None, "CORE-18 (partial)", 0.22)
    # r3: rl is the final chat model; its ChatCORE did not run, so the headline is CORE (sft's score is not rl's)
    assert got["r3"][2] == "cpu" and got["r3"][12:] == ("chat_eval_rl", "ChatCORE", None, "CORE-18 (partial)", 0.22)
    # r4: chat_eval_base is never the chat score
    assert got["r4"][12:] == (None, None, None, "CORE-18 (partial)", 0.22)


def test_hardware_names_each_device_type_with_its_most_devices(tmp_path):
    store = Store(str(tmp_path))
    ledger.append(store, _row("r", "base", False, 10.0, device="H100", devices=4))
    ledger.append(store, _row("r", "mid", False, 10.0, device="H100", devices=8))
    ledger.append(store, _row("r", "data", False, 10.0))
    ledger.append(store, _row("r", "sft", True, 10.0, device="A100", devices=2))  # a hit computes on nothing
    assert catalog.connect(store).execute("select hardware, device_types from runs").fetchone() == ("8×H100 + cpu", ["H100", "cpu"])


def _attempt(store, run, stage, started_ago, beat_ago, devices=8, price=3.0):
    """A `running` row as the runner's heartbeat leaves it: its start and last heartbeat relative to now, the
    wall, device-hours and dollars up to that heartbeat."""
    now = datetime.now(timezone.utc)
    start, beat = now - timedelta(seconds=started_ago), now - timedelta(seconds=beat_ago)
    row = ledger.LedgerRow(
        run_id=run, stage=stage, key=stage * 3, cache_hit=False, start=start.isoformat(), end=beat.isoformat(),
        wall_seconds=started_ago - beat_ago, device_type="H100", devices=devices, nodes=1, price_per_device_hour=price,
        status="running", preset="d20", last_heartbeat=beat.isoformat())
    attempt = ledger.Attempt(store, run, stage, row.start)
    attempt._write(row, final=False)  # one heartbeat, and no thread: the process that wrote it is gone (or paused)
    return attempt, row


def test_a_running_row_whose_heartbeat_stopped_is_interrupted_and_its_dollars_count(tmp_path, monkeypatch):
    monkeypatch.delenv(ledger.HEARTBEAT_ENV, raising=False)  # 30 s heartbeats: stale after 90 s
    store = Store(str(tmp_path))
    ledger.append(store, _row("r", "data", False, 60.0))  # a stage of the same run that ended
    # killed an hour into training: its last heartbeat is 10 minutes old
    _attempt(store, "r", "base", started_ago=4200, beat_ago=600)  # 3600 s × 8 × $3/h = $24
    _attempt(store, "live", "base", started_ago=100, beat_ago=5)  # training now
    con = catalog.connect(store)
    got = con.execute("select run_id, status, wall_seconds, round(device_hours, 6), round(cost_usd, 6) from stage_runs "
                      "where stage = 'base' order by run_id").fetchall()
    assert got == [("live", "running", 95.0, round(95 * 8 / 3600, 6), round(95 * 8 / 3600 * 3, 6)),
                   ("r", "interrupted", 3600.0, 8.0, 24.0)]
    end, start = con.execute("select \"end\", start from stage_runs where run_id = 'r' and stage = 'base'").fetchone()
    assert (end - start).total_seconds() == pytest.approx(3600, abs=0.01)  # its end is its last heartbeat
    runs = {r[0]: r[1:] for r in con.execute(
        "select run_id, round(cost_usd, 6), round(device_hours, 6), stage_executions, failures, interrupted, running, "
        "hardware, finished is null from runs").fetchall()}
    # the interrupted attempt is in the run's dollars and device-hours; the live one is shown, not yet counted
    assert runs["r"] == (24.0, round(8.0 + 60 / 3600, 6), 2, 0, 1, 0, "8×H100 + cpu", False)
    assert runs["live"] == (0.0, 0.0, 0, 0, 0, 1, "8×H100", True)


def test_the_final_row_replaces_the_running_one_in_the_cached_catalog(tmp_path, monkeypatch):
    monkeypatch.delenv(ledger.HEARTBEAT_ENV, raising=False)
    store = Store(str(tmp_path / "store"))
    attempt, row = _attempt(store, "r", "base", started_ago=100, beat_ago=1)
    cat = catalog.open_catalog(store, tmp_path / "cache.duckdb")
    assert cat.con.execute("select status, count(*) over () from stage_runs").fetchall() == [("running", 1)]
    final = ledger.LedgerRow(**{**row.__dict__, "status": "completed", "wall_seconds": 120.0, "last_heartbeat": "",
                                "end": datetime.now(timezone.utc).isoformat()})
    assert attempt.finish(final)
    cat.refresh()  # the same file, rewritten: its row is replaced, not added
    assert cat.con.execute("select status, wall_seconds, cost_usd from stage_runs").fetchall() == [("completed", 120.0, 120 * 8 / 3600 * 3)]
    assert cat.con.execute("select cost_usd, running from runs").fetchone() == (120 * 8 / 3600 * 3, 0)


def test_a_dead_attempt_shows_interrupted_without_a_refresh(tmp_path, monkeypatch):
    """Staleness is decided when a query runs: the cached catalog re-reads nothing for a heartbeat that stopped."""
    monkeypatch.setenv(ledger.HEARTBEAT_ENV, "0.2")  # the writer's interval, as tests shorten it for both sides
    store = Store(str(tmp_path / "store"))
    _attempt(store, "r", "base", started_ago=10, beat_ago=0)
    cat = catalog.open_catalog(store, tmp_path / "cache.duckdb")
    assert cat.con.execute("select status from stage_runs").fetchone() == ("running",)
    time.sleep(0.7)  # three intervals and a bit
    assert cat.con.execute("select status from stage_runs").fetchone() == ("interrupted",)
    assert cat.con.execute("select interrupted, cost_usd > 0 from runs").fetchone() == (1, True)


def test_artifacts_and_evals_tables(tmp_path):
    store = Store(str(tmp_path))
    _commit(store, "k" * 64)
    rows = [{"suite": "CORE-2 (partial)", "task": "copa", "metric": "centered", "value": 0.1, "n": 40, "status": "ok"},
            {"suite": "CORE-2 (partial)", "task": "squad", "metric": "centered", "value": None, "n": None,
             "status": "not run: data unavailable"}]
    _commit(store, "a" * 64, "base_eval", "eval", {"evals.json": rows})
    con = catalog.connect(store)
    assert con.execute("select kind, config->>'vocab_size', parents->>'data' from artifacts where key = ?", ["k" * 64]).fetchone() \
        == ("tokenizer", "512", "d" * 64)
    got = con.execute("select key, stage, suite, task, metric, value, n, status from evals order by task").fetchall()
    assert got == [("a" * 64, "base_eval", "CORE-2 (partial)", "copa", "centered", 0.1, 40, "ok"),
                   ("a" * 64, "base_eval", "CORE-2 (partial)", "squad", "centered", None, None, "not run: data unavailable")]


def test_unreadable_files_are_skipped_and_listed_while_the_rest_is_queryable(tmp_path):
    store = Store(str(tmp_path))
    ledger.append(store, _row("r1", "data", False, 5.0))
    ledger.append(store, _row("r1", "base", False, 5.0, metrics={"loss": float("nan")}))  # a diverged loss is not fatal
    bad_row = ledger.append(store, _row("r1", "tokenizer", False, 5.0))
    with open(bad_row, "r+b") as f:  # a row cut short mid-write
        f.truncate(40)
    typed = tmp_path / "ledger" / "r1" / "typed.json"
    typed.write_text(json.dumps({**_row("r1", "mid", False, 1.0).to_dict(), "devices": "eight"}))
    _commit(store, "k" * 64)
    _commit(store, "g" * 64)
    (tmp_path / "artifacts" / ("g" * 64) / "manifest.json").write_bytes(b"\x00garbage\xff")
    _commit(store, "e" * 64, "base_eval", "eval", {"evals.json": {"not": "a list"}})
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r1.json").write_text("{")

    con = catalog.connect(store)
    assert con.execute("select stage from stage_runs order by stage").fetchall() == [("base",), ("data",)]
    assert con.execute("select metrics->>'loss' from stage_runs where stage = 'base'").fetchone()[0] is None
    assert sorted(k for (k,) in con.execute("select key from artifacts").fetchall()) == ["e" * 64, "k" * 64]
    assert con.execute("select stage_executions from runs").fetchone()[0] == 2
    skipped = dict(con.execute("select path, reason from skipped").fetchall())
    assert set(skipped) == {bad_row, str(typed), f"{tmp_path}/artifacts/{'g' * 64}/manifest.json",
                            f"{tmp_path}/artifacts/{'e' * 64}/evals.json", f"{tmp_path}/runs/r1.json"}
    assert skipped[bad_row].startswith("truncated or invalid JSON")
    assert skipped[str(typed)] == 'devices: expected an integer, got "eight"'
    assert skipped[f"{tmp_path}/artifacts/{'e' * 64}/evals.json"] == "expected a list of eval rows, got an object"


def test_cache_refreshes_incrementally_and_drops_quarantined_artifacts(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    cache = tmp_path / "cache" / "catalog.duckdb"
    ledger.append(store, _row("r1", "data", False, 5.0))
    _commit(store, "k" * 64)
    _commit(store, "a" * 64, "base_eval", "eval", {"evals.json": [{"suite": "bpb", "task": "val", "metric": "bpb", "value": 1.0}]})
    cat = catalog.open_catalog(store, cache)
    assert cat.path == cache and cat.note == "" and cat.con.execute("select count(*) from runs").fetchone()[0] == 1
    cat.close()

    read: list[str] = []
    real_read = catalog_files.read
    monkeypatch.setattr(catalog_files, "read", lambda s, paths: read.extend(paths) or real_read(s, paths))
    cat = catalog.open_catalog(store, cache)  # reopened: the rows are in the file, nothing is read again
    assert read == [] and cat.con.execute("select count(*) from evals").fetchone()[0] == 1

    new_row = ledger.append(store, _row("r2", "data", True, 0.1))
    cat.refresh()
    assert read == [new_row]
    assert cat.con.execute("select run_id, cache_hits from runs order by run_id").fetchall() == [("r1", 0), ("r2", 1)]

    store.quarantine("a" * 64)  # a corrupt artifact moved to trash: its manifest and eval rows leave the catalog
    cat.refresh()
    assert cat.con.execute("select key from artifacts").fetchall() == [("k" * 64,)]
    assert cat.con.execute("select count(*) from evals").fetchone()[0] == 0

    _commit(store, "k" * 64, metrics={"vocab_size": 1024})  # a forced recompute replaces the manifest in place
    cat.refresh()
    assert cat.con.execute("select metrics->>'vocab_size' from artifacts").fetchall() == [("1024",)]
    before = len(read)
    cat.refresh()
    assert len(read) == before  # nothing new: nothing read


def test_a_cache_held_by_another_process_falls_back_to_memory(tmp_path):
    store = Store(str(tmp_path / "store"))
    ledger.append(store, _row("r1", "data", False, 5.0))
    cache = tmp_path / "held.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(cache)!r}); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cat = catalog.open_catalog(store, cache)
        assert cat.path is None and "in use by another process" in cat.note
        assert cat.con.execute("select count(*) from runs").fetchone()[0] == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_threads_sharing_a_cache_file_never_ingest_a_row_twice(tmp_path):
    """Two dashboard sessions are two threads of one process, each with its own Catalog on the same file."""
    import threading

    store = Store(str(tmp_path / "store"))
    cache = tmp_path / "cache.duckdb"
    cats = [catalog.open_catalog(store, cache) for _ in range(2)]
    for i in range(40):
        ledger.append(store, _row(f"r{i}", "data", False, 1.0))
    threads = [threading.Thread(target=c.refresh) for c in cats for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in cats:
        cur = c.cursor()
        assert cur.execute("select count(*), count(distinct run_id) from stage_runs").fetchone() == (40, 40)


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    store = Store(str(tmp_path / "store"))
    ledger.append(store, _row("r1", "data", False, 5.0))
    cache = tmp_path / "bad.duckdb"
    cache.write_bytes(b"not a duckdb file" * 100)
    cat = catalog.open_catalog(store, cache)
    assert cat.path == cache and cat.con.execute("select count(*) from stage_runs").fetchone()[0] == 1


def test_export_writes_a_duckdb_file_other_tools_can_query(runs_store, tmp_path):
    out = tmp_path / "out" / "catalog.duckdb"
    out.parent.mkdir()
    counts = catalog.export(runs_store, out, cache=tmp_path / "cache.duckdb")
    assert counts["runs"] == 4 and counts["stage_runs"] == 15 and counts["skipped"] == 0
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("select round(cost_usd, 2), score_name from runs where run_id = 'r1'").fetchone() == (86.4, "ChatCORE-5 (partial)")
    tables = {t for (t,) in con.execute("select table_name from information_schema.tables").fetchall()}
    assert tables == set(catalog.EXPORTED)
    with pytest.raises(catalog.CatalogError, match="does not exist"):
        catalog.export(runs_store, tmp_path / "nowhere" / "x.duckdb", cache=tmp_path / "cache.duckdb")


def test_bad_sql_is_one_line(tmp_path):
    con = catalog.connect(Store(str(tmp_path)))
    with pytest.raises(catalog.CatalogError) as e:
        catalog.query(con, "select final_score from runs")
    assert "\n" not in str(e.value) and 'column "final_score" not found' in str(e.value) and "stage_runs" in str(e.value)
    assert "0" in catalog.query(con, "select count(*) from runs")


def cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_query_error_export_and_skipped_warning(runs_store, tmp_path):
    env = {"CHATFORGE_HOME": str(tmp_path / "home")}
    r = cli("artifacts", "query", "--store", runs_store.url, "select * from nope", env=env)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("chatforge: error: query failed: Catalog Error: Table with name nope")
    (tmp_path / "store" / "ledger" / "r1" / "zz.json").write_text("{\"run_id\":")
    r = cli("catalog", "export", "--store", runs_store.url, str(tmp_path / "x.duckdb"), env=env)
    assert r.returncode == 0 and "runs (4 rows)" in r.stdout and "1 unreadable store file(s) skipped" in r.stderr
    assert duckdb.connect(str(tmp_path / "x.duckdb")).execute("select count(*) from skipped").fetchone()[0] == 1
    assert list((tmp_path / "home" / "catalog").glob("*.duckdb"))  # the cache lives under $CHATFORGE_HOME/catalog
