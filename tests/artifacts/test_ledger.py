"""The ledger's attempt rows: `running` and heartbeating from the start, replaced once by the final row at the
same path, never overwritten after it; and the one staleness rule (Python and SQL) that turns a running row
whose heartbeat stopped into `interrupted`."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from artifacts import ledger
from artifacts.store import Store

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _row(status="running", seconds=0.0, start=T0, **kw) -> ledger.LedgerRow:
    end = (start + timedelta(seconds=seconds)).isoformat()
    return ledger.LedgerRow(
        run_id="r", stage="base", key="k" * 64, cache_hit=False, start=start.isoformat(), end=end,
        wall_seconds=seconds, device_type="cpu", devices=2, nodes=1, price_per_device_hour=1.0, status=status,
        last_heartbeat=end if status == "running" else "", **kw)


def _files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "ledger" / "r").glob("*.json"))


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_an_attempt_is_running_then_heartbeats_then_is_replaced_by_its_final_row(tmp_path):
    store = Store(str(tmp_path))
    beats = []

    def running():
        beats.append(1)
        return _row(seconds=len(beats))  # the wall so far grows with every heartbeat

    attempt = ledger.Attempt(store, "r", "base", T0.isoformat())
    attempt.begin(running, every=0.02)
    # written before begin returns: the attempt is in the ledger before it spends anything
    first = json.loads(Path(attempt.path).read_text())
    assert first["status"] == "running" and first["last_heartbeat"] == first["end"] and first["wall_seconds"] >= 1
    _wait(lambda: json.loads(Path(attempt.path).read_text())["wall_seconds"] >= 3)
    beat = json.loads(Path(attempt.path).read_text())
    assert beat["device_hours"] == pytest.approx(beat["wall_seconds"] / 3600 * 2) and beat["cost_usd"] == beat["device_hours"]

    assert attempt.finish(_row("completed", seconds=5.0, metrics={"steps": 3}))
    n = len(beats)
    time.sleep(0.1)  # five heartbeat intervals: none may come
    final = json.loads(Path(attempt.path).read_text())
    assert len(beats) == n and final["status"] == "completed" and final["metrics"] == {"steps": 3}
    assert "last_heartbeat" not in final  # a final row's `end` is its end
    assert _files(tmp_path) == [Path(attempt.path)]  # exactly one row per attempt
    assert not [t for t in threading.enumerate() if t.name.startswith("ledger-heartbeat")]


def test_a_final_row_is_never_overwritten(tmp_path):
    store = Store(str(tmp_path))
    attempt = ledger.Attempt(store, "r", "base", T0.isoformat())
    attempt.begin(lambda: _row(seconds=1.0), every=0.01)
    assert attempt.finish(_row("failed", seconds=2.0, error="OutOfMemoryError: boom"))
    assert not attempt.finish(_row("completed", seconds=3.0))  # a second final row is refused
    time.sleep(0.05)
    row = json.loads(Path(attempt.path).read_text())
    assert (row["status"], row["error"], row["wall_seconds"]) == ("failed", "OutOfMemoryError: boom", 2.0)


def test_a_heartbeat_that_cannot_be_written_is_logged_and_the_next_one_is(tmp_path):
    class FlakyStore(Store):
        """A real store whose second write fails, as an object store's PUT sometimes does."""
        writes = 0

        def write_json(self, path, obj):
            FlakyStore.writes += 1
            if FlakyStore.writes == 2:
                raise OSError("503 Slow Down")
            super().write_json(path, obj)

    logs: list[str] = []
    beats = []
    attempt = ledger.Attempt(FlakyStore(str(tmp_path)), "r", "base", T0.isoformat(), log=logs.append)
    attempt.begin(lambda: beats.append(1) or _row(seconds=len(beats)), every=0.01)
    _wait(lambda: json.loads(Path(attempt.path).read_text())["wall_seconds"] >= 3)
    attempt.finish(_row("completed", seconds=9.0))
    assert logs and logs[0].startswith("ledger: heartbeat not written (OSError: 503 Slow Down); trying again in 0.01 s")
    assert json.loads(Path(attempt.path).read_text())["status"] == "completed"


def test_status_at_turns_a_running_row_interrupted_after_three_missed_heartbeats(monkeypatch):
    monkeypatch.delenv(ledger.HEARTBEAT_ENV, raising=False)
    assert ledger.heartbeat_seconds() == 30.0 and ledger.stale_after_seconds() == 90.0
    row = _row(seconds=600.0).to_dict()
    beat = T0 + timedelta(seconds=600)
    assert ledger.status_at(row, now=beat + timedelta(seconds=5)) == "running"
    assert ledger.status_at(row, now=beat + timedelta(seconds=90)) == "running"  # exactly three intervals: not yet
    assert ledger.status_at(row, now=beat + timedelta(seconds=90.001)) == "interrupted"
    for final in ("completed", "failed"):  # a final row is what it says, however old
        assert ledger.status_at(_row(final, seconds=1.0).to_dict(), now=beat + timedelta(days=9)) == final
    # rows from before heartbeats: no status, or no last_heartbeat (then `end` is the heartbeat)
    old = {k: v for k, v in row.items() if k not in ("status", "last_heartbeat")}
    assert ledger.status_at(old, now=beat + timedelta(days=9)) == "completed"
    assert ledger.status_at({**old, "status": "running"}, now=beat + timedelta(days=9)) == "interrupted"
    monkeypatch.setenv(ledger.HEARTBEAT_ENV, "0.5")  # how tests shorten it, for writers and readers alike
    assert ledger.status_at(row, now=beat + timedelta(seconds=2)) == "interrupted"
    monkeypatch.setenv(ledger.HEARTBEAT_ENV, "0")
    with pytest.raises(ValueError, match="CHATFORGE_HEARTBEAT_SECONDS='0': expected a number of seconds > 0"):
        ledger.heartbeat_seconds()


@pytest.mark.parametrize("interval", ["30", "0.25"])
def test_the_sql_rule_is_the_python_rule(interval, monkeypatch):
    monkeypatch.setenv(ledger.HEARTBEAT_ENV, interval)
    con = duckdb.connect()
    con.execute(ledger.status_macro("st"))
    stale = ledger.stale_after_seconds()
    beat = T0 + timedelta(seconds=10)
    for status in ("running", "completed", "failed"):
        for age in (0.0, stale / 2, stale, stale + 1e-6, stale + 0.001, stale * 10):
            now = beat + timedelta(seconds=age)
            row = {"status": status, "end": beat.isoformat(), "last_heartbeat": beat.isoformat()}
            sql = con.execute("select st(?, ?::timestamptz, ?::timestamptz)", [status, beat, now]).fetchone()[0]
            assert sql == ledger.status_at(row, now=now), (status, age)


def test_the_report_card_shows_an_interrupted_attempt_and_names_a_running_one(tmp_path, monkeypatch):
    """Readers through the catalog: the card charges the killed attempt up to its last heartbeat, and leaves out an
    attempt still running (named, unless it is outside the DAG given: the report stage writing this very card)."""
    from artifacts import report
    from artifacts.catalog import connect

    monkeypatch.delenv(ledger.HEARTBEAT_ENV, raising=False)
    store = Store(str(tmp_path))
    now = datetime.now(timezone.utc)
    ledger.append(store, ledger.LedgerRow(
        run_id="r", stage="data", key="d" * 64, cache_hit=False, start=(now - timedelta(hours=3)).isoformat(),
        end=(now - timedelta(hours=3) + timedelta(seconds=60)).isoformat(), wall_seconds=60.0, device_type="cpu",
        devices=1, nodes=1, price_per_device_hour=0.0))
    killed = _row(seconds=1800.0, start=now - timedelta(hours=2))  # heartbeat stopped 1.5 h ago, 30 min in
    killed.devices, killed.device_type, killed.price_per_device_hour = 8, "H100", 3.0
    ledger.append(store, killed)
    live = _row(seconds=1.0, start=now - timedelta(seconds=2))
    live.stage, live.key = "report", "r" * 64
    ledger.append(store, live)

    dag = ["data", "tokenizer", "base", "report"]
    card = report.card(connect(store), "r", dag=dag[:-1])  # as the report stage calls it: its own attempt left out
    assert [(s["stage"], s["result"]) for s in card["stages"]] == [("data", "computed"), ("base", "interrupted")]
    base = card["stages"][1]
    assert base["device_hours"] == pytest.approx(4.0) and base["cost_usd"] == pytest.approx(12.0)  # 0.5 h × 8 × $3
    assert card["running"] == [] and card["not_run"] == ["tokenizer"]
    assert card["totals"]["cost_usd"] == pytest.approx(12.0) and card["totals"]["interrupted"] == 1
    assert card["totals"]["stage_executions"] == 2  # the running attempt is not counted yet
    md = report.markdown(card)
    assert "### base · interrupted · 30 m 00 s · $12.00" in md and "Interrupted: its heartbeat stopped at " in md
    assert "Not run: tokenizer (the run stopped: base interrupted)." in md
    assert "2 stage executions: 1 computed, 0 cached, 0 failed, 1 interrupted" in md
    assert "Running:" not in md

    cli_card = report.card(connect(store), "r", dag=dag)  # `chatforge report` while the report stage runs
    assert cli_card["running"] == ["report"] and "report" not in cli_card["not_run"]
    assert "Running: report (not in this card until it ends, or its heartbeat stops: then it shows as interrupted)." \
        in report.markdown(cli_card)
