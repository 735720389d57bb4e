"""The ledger: one small JSON file per stage attempt, in the store (no shared file, no lock).

Every attempt is in the ledger, a killed one too (kill -9, a preempted node, the OOM killer), because the dollars
it burned are real and the cost a user compares must count them exactly when things go wrong:

- when a stage starts work (its key was not in the store), the runner writes the attempt's row as `running`
  and rewrites it every `heartbeat_seconds()` (`Attempt`): `end` and `last_heartbeat` are the time of the last
  heartbeat, `wall_seconds`, device-hours and `cost_usd` what the attempt had burned by then;
- the final row replaces it at the same path, `completed` or `failed` (a failed stage burned device time too),
  so there is exactly one row per attempt. The heartbeat is stopped first and never writes after the final row;
- a `running` row whose heartbeat is more than `STALE_HEARTBEATS` intervals old belongs to a process that died
  without a word: readers report it as `interrupted`, with the device time up to its last heartbeat, and count
  its dollars in the run's cost. The rule is `status_at` in Python and `status_macro()` in SQL (the catalog's
  `stage_runs`), built from the same numbers; `now` is a parameter of both.

A cache hit found at once is written once, as `completed` with cost 0 (it needs no heartbeat: it spends no device
time). Rows are whole-object writes (tmp + rename on a local store), so a reader sees one version of a row or the
next, never half of one. DuckDB reads them as the `stage_runs` table (catalog.py); rows written before heartbeats
existed (no `last_heartbeat`, never `running`) read as they always did.
"""
from __future__ import annotations

import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping

from .errors import StoreError
from .store import Store

# The built-in $ per device-hour. GPU prices follow nanochat's figure of ~$24/h for an 8×H100 node; CPU is
# counted as free (a laptop). A price file or `--set cost.prices.<device>=<usd>` overrides them (prices.py).
DEFAULT_PRICES = {"H100": 3.0, "H200": 3.5, "A100": 1.8, "cpu": 0.0}

# How often a running attempt rewrites its row. A kill loses at most this much of the attempt's device time
# from the ledger; every heartbeat is one small write (one PUT on an object store).
HEARTBEAT_SECONDS = 30.0
# Missed heartbeats before a `running` row counts as interrupted: one late write (a slow object store, a paused
# VM) must not make a live attempt look dead.
STALE_HEARTBEATS = 3
HEARTBEAT_ENV = "CHATFORGE_HEARTBEAT_SECONDS"
RUNNING, INTERRUPTED = "running", "interrupted"


def heartbeat_seconds() -> float:
    """The heartbeat interval: `HEARTBEAT_SECONDS`, or $CHATFORGE_HEARTBEAT_SECONDS (tests shorten it). Writers
    and readers of one store must agree on it: a reader with a shorter interval takes live attempts for dead."""
    raw = os.environ.get(HEARTBEAT_ENV)
    if not raw:
        return HEARTBEAT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{HEARTBEAT_ENV}={raw!r}: expected a number of seconds > 0 (unset it for {HEARTBEAT_SECONDS:g})")
    return value


def stale_after_seconds() -> float:
    """How old a `running` row's last heartbeat may be before the attempt counts as interrupted."""
    return STALE_HEARTBEATS * heartbeat_seconds()


def status_at(row: Mapping, now: datetime | None = None) -> str:
    """The status a reader reports for a ledger row (a dict as written) at `now` (default: the current time):
    its own, except a `running` row whose last heartbeat is older than `stale_after_seconds()`: `interrupted`."""
    status = row.get("status") or "completed"
    if status != RUNNING:
        return status
    beat = _time(row.get("last_heartbeat") or row["end"])
    now = now or datetime.now(timezone.utc)
    return INTERRUPTED if (now - beat).total_seconds() > stale_after_seconds() else RUNNING


def status_macro(name: str = "ledger_status") -> str:
    """`status_at` as a DuckDB macro `name(status, last_heartbeat, now)` (the catalog's `stage_runs` calls it with
    now()): the same rule, the same threshold, to the microsecond."""
    stale_us = round(stale_after_seconds() * 1e6)
    return (f"CREATE OR REPLACE MACRO {name}(status, last_heartbeat, now) AS "
            f"CASE WHEN status = '{RUNNING}' AND last_heartbeat < now - to_microseconds({stale_us}) "
            f"THEN '{INTERRUPTED}' ELSE status END")


def _time(value: str | datetime) -> datetime:
    t = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass
class LedgerRow:
    run_id: str
    stage: str
    key: str
    cache_hit: bool
    start: str
    end: str  # the attempt's end; for a `running` row, its last heartbeat
    wall_seconds: float
    device_type: str
    devices: int
    nodes: int
    price_per_device_hour: float
    price_source: str = "built-in"  # where the price came from: 'built-in', 'file:<path>', '--set cost.prices.<type>'
    status: str = "completed"  # running (then interrupted, to readers, once its heartbeat stops) | completed | failed
    preset: str = ""
    error: str = ""
    metrics: dict = field(default_factory=dict)
    last_heartbeat: str = ""  # `running` rows only: when the attempt last said it was alive (equal to `end`)

    @property
    def device_hours(self) -> float:
        return 0.0 if self.cache_hit else self.wall_seconds / 3600 * self.devices * self.nodes

    @property
    def cost_usd(self) -> float:
        return self.device_hours * self.price_per_device_hour

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.last_heartbeat:
            del d["last_heartbeat"]  # a final row: its `end` says it all
        d["device_hours"] = self.device_hours
        d["cost_usd"] = self.cost_usd
        return d


def row_path(store: Store, run_id: str, stage: str, start: str) -> str:
    """A new attempt's file: the start time first (a listing sorts by it), a random suffix so that two attempts
    that start in the same millisecond (identical concurrent runs) never share a file."""
    return store._p("ledger", run_id, f"{start.replace(':', '')}-{stage}-{uuid.uuid4().hex[:8]}.json")


def append(store: Store, row: LedgerRow) -> str:
    """Write one finished attempt's row (no heartbeat: a cache hit, or hand-made rows); returns its path."""
    path = row_path(store, row.run_id, row.stage, row.start)
    store.write_json(path, row.to_dict())
    return path


class Attempt:
    """One stage attempt's row at one path: `running` and rewritten every heartbeat from `begin` on, then
    replaced once by the final row (`finish`). The heartbeat runs in a daemon thread of the process that runs
    the stage, so it stops with that process, whatever kills it: the stopped heartbeat is what tells a reader
    the attempt was interrupted."""

    def __init__(self, store: Store, run_id: str, stage: str, start: str, log: Callable[[str], None] = print):
        self.store, self.log = store, log
        self.path = row_path(store, run_id, stage, start)
        self._lock = threading.Lock()  # one write at a time; after the final one, none
        self._final = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, running: Callable[[], LedgerRow], every: float | None = None) -> None:
        """Write `running()` now (the attempt is in the ledger before it spends anything) and again every `every`
        seconds (default `heartbeat_seconds()`) until `finish`. A heartbeat that cannot be written is logged and
        tried again at the next one: the stage goes on."""
        every = heartbeat_seconds() if every is None else every
        self._write(running(), final=False)

        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    self._write(running(), final=False)
                except Exception as e:  # noqa: BLE001 - a store hiccup must not fail hours of training
                    self.log(f"ledger: heartbeat not written ({type(e).__name__}: {e}); trying again in {every:g} s")

        self._thread = threading.Thread(target=beat, name=f"ledger-heartbeat {self.path.rsplit('/', 1)[-1]}", daemon=True)
        self._thread.start()

    def finish(self, row: LedgerRow) -> bool:
        """Stop the heartbeat and write the final row over the running one. Only the first call writes (False
        after that): a completed or failed row is never overwritten, by a heartbeat or by anything else."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()  # a heartbeat being written ends before the final row is
        return self._write(row, final=True)

    def _write(self, row: LedgerRow, final: bool) -> bool:
        with self._lock:
            if self._final:
                return False
            self.store.write_json(self.path, row.to_dict())
            self._final = final
            return True


def record_run(store: Store, run_id: str, info: dict) -> None:
    """The config and origin of a run, so `chatforge stage NAME --run RUN` can reuse its config."""
    store.write_json(store._p("runs", f"{run_id}.json"), {"run_id": run_id, **info})


def read_run(store: Store, run_id: str) -> dict:
    """The run's record; a torn or foreign file is a one-line StoreError naming it (FileNotFoundError if absent)."""
    path = store._p("runs", f"{run_id}.json")
    try:
        info = store.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise StoreError(f"run file {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                         "`chatforge artifacts gc --quarantine` moves it aside; rerun with --preset/--set instead of --run") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise StoreError(f"run file {path} holds no config: rerun with --preset/--set instead of --run")
    return info
