"""DuckDB over the store's files: `stage_runs`, `runs` (the cost / time / score triple), `artifacts`,
`run_info`, `evals`, and `skipped` (the files that could not be read, and why).

`stage_runs` has one row per stage attempt, whose status is `completed`, `failed`, `running`, or `interrupted`:
a `running` row whose heartbeat stopped (ledger.py's rule, as the macro `ledger_status`). That is decided when
a query runs, not when a file is read, so the cached catalog needs no refresh for a dead attempt to show.

The JSON files in the store are the truth; DuckDB only reads them. Two ways to hold the catalog:

- `connect(store)`: in memory, built from scratch (the CLI's `artifacts query`, the run summary);
- `open_catalog(store)`: a DuckDB file under `$CHATFORGE_HOME/catalog/`, refreshed incrementally:
  `refresh()` lists the store, reads only the files it has not seen (or that changed), drops the rows of
  files that are gone (a quarantined or gc'd artifact), and returns in milliseconds when nothing changed.
  This is what lets a dashboard page over 1,000 runs load in well under 2 s.

Reading never locks or writes the store, so a running flow is never blocked; a file that appears during
a refresh is read by the next one. A cache file held by another process (DuckDB allows one writer per
file) or unwritable falls back to an in-memory catalog; threads of one process share one file safely.
"""
from __future__ import annotations

import json

import hashlib
import os
import threading
import uuid
from pathlib import Path

import duckdb

from . import catalog_files as cf
from . import ledger
from .store import DEFAULT_ROOT, Store

VERSION = "3"  # of the cache's tables and of the reading rules: a cache of another version is rebuilt
RAW = {"ledger": "ledger_rows", "manifest": "manifest_rows", "run": "run_rows", "evals": "eval_rows"}
EXPORTED = ("runs", "stage_runs", "artifacts", "run_info", "evals", "skipped")
CHAT_FINAL = ("chat_eval_rl", "chat_eval_sft", "chat_eval_mid")  # the final chat model's eval, best first

_VIEWS = {
    "stage_runs": """
        -- saved_usd of a cache hit: what computing its key cost (the computation that finished last before
        -- the hit started; else the latest one, any run). Computed rows and failures save nothing.
        WITH made AS (SELECT key, "end", cost_usd FROM ledger_rows WHERE NOT cache_hit AND status = 'completed'),
             latest AS (SELECT key, arg_max(cost_usd, "end") AS cost FROM made GROUP BY key)
        -- status as readers report it (ledger.py): a `running` row whose heartbeat stopped is `interrupted`. Its
        -- "end" is its last heartbeat, and its wall, device-hours and dollars are those up to it, as written.
        SELECT l.run_id, l.stage, l.key, l.cache_hit, l.start, l."end", l.wall_seconds, l.device_type, l.devices,
               l.nodes, l.device_hours, l.price_per_device_hour, l.cost_usd,
               ledger_status(l.status, l."end", now()) AS status, l.preset, l.error, l.metrics,
               l.price_source,
               CASE WHEN l.cache_hit THEN coalesce(b.cost_usd, a.cost, 0.0) ELSE 0.0 END AS saved_usd
        FROM ledger_rows l
        ASOF LEFT JOIN made b ON l.key = b.key AND l.start >= b."end"
        LEFT JOIN latest a ON l.key = a.key""",
    "artifacts": "SELECT " + ", ".join(f'"{c}"' for c in cf.COLUMNS["manifest"]) + " FROM manifest_rows",
    "run_info": "SELECT run_id, preset, started, host, config, flow_run_name, env FROM run_rows",
    "evals": """
        SELECT a.key, a.stage, a.created, e.suite, e.task, e.metric, e.value, e.n, e.status
        FROM eval_rows e JOIN manifest_rows a ON e.key = a.key""",
    "skipped": "SELECT path, reason FROM catalog_files WHERE reason IS NOT NULL",
    # The triple, defined here once (summary, report card and dashboard read it): dollars (computed, failed and
    # interrupted attempts at the price each row recorded; cache hits cost 0 and show what they saved), time (wall
    # clock from the first start to the last end, and the sum of stage times), score (CORE of the base
    # model; ChatCORE of the final chat model: rl, else sft, else mid — never chat_eval_base — each under
    # the name its eval gave it, so a partial suite stays partial; the headline is the chat score if any).
    # An attempt still `running` is not in the totals yet (`running` counts them; stage_runs shows what they have
    # spent so far): the triple is of attempts that ended or stopped, so it does not creep while a stage runs,
    # and the report stage's card leaves out its own attempt. `started` is the first start, running or not.
    "runs": f"""
        WITH agg AS (
            SELECT run_id, any_value(preset) FILTER (WHERE preset <> '') AS preset,
                   min(start) AS started, max("end") FILTER (WHERE ended) AS finished,
                   date_diff('millisecond', min(start), max("end") FILTER (WHERE ended)) / 1000.0 AS wall_clock_seconds,
                   coalesce(sum(wall_seconds) FILTER (WHERE ended), 0.0) AS stage_seconds,
                   coalesce(sum(cost_usd) FILTER (WHERE ended AND NOT cache_hit), 0.0) AS cost_usd,
                   coalesce(sum(saved_usd) FILTER (WHERE ended), 0.0) AS saved_usd,
                   coalesce(sum(device_hours) FILTER (WHERE ended), 0.0) AS device_hours,
                   count(*) FILTER (WHERE ended) AS stage_executions, count(*) FILTER (WHERE cache_hit) AS cache_hits,
                   count(*) FILTER (WHERE status = 'failed') AS failures,
                   count(*) FILTER (WHERE status = 'interrupted') AS interrupted,
                   count(*) FILTER (WHERE NOT ended) AS running
            FROM (SELECT *, status <> 'running' AS ended FROM stage_runs) GROUP BY run_id),
        per_device AS (
            SELECT run_id, device_type, max(devices * nodes) AS n
            FROM stage_runs WHERE NOT cache_hit GROUP BY run_id, device_type),
        hw AS (
            SELECT run_id,
                   string_agg(CASE WHEN n > 1 THEN n || '×' || device_type ELSE device_type END, ' + '
                              ORDER BY device_type = 'cpu', n DESC, device_type) AS hardware,
                   list(device_type ORDER BY device_type) AS device_types
            FROM per_device GROUP BY run_id),
        core AS (
            SELECT run_id, metrics->>'score_name' AS core_name, TRY_CAST(metrics->>'score' AS DOUBLE) AS core
            FROM stage_runs WHERE stage = 'base_eval' AND status = 'completed'
            QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY "end" DESC) = 1),
        chat AS (
            SELECT run_id, stage AS chat_stage, metrics->>'score_name' AS chat_name,
                   TRY_CAST(metrics->>'score' AS DOUBLE) AS chat_score
            FROM stage_runs WHERE stage IN {CHAT_FINAL} AND status = 'completed'
            QUALIFY row_number() OVER (PARTITION BY run_id
                                       ORDER BY list_position({list(CHAT_FINAL)}, stage), "end" DESC) = 1)
        SELECT a.run_id, coalesce(i.preset, a.preset) AS preset, i.host, hw.hardware, a.started, a.finished,
               a.wall_clock_seconds, a.stage_seconds, a.cost_usd, a.saved_usd, a.stage_executions, a.cache_hits,
               a.failures, core.core_name, core.core, chat.chat_stage, chat.chat_name, chat.chat_score,
               CASE WHEN chat.chat_score IS NOT NULL THEN chat.chat_name WHEN core.core IS NOT NULL THEN core.core_name
                    ELSE coalesce(chat.chat_name, core.core_name) END AS score_name,
               coalesce(chat.chat_score, core.core) AS score,
               a.device_hours, hw.device_types, a.interrupted, a.running
        FROM agg a
        LEFT JOIN (SELECT * FROM run_info QUALIFY row_number() OVER (PARTITION BY run_id) = 1) i ON a.run_id = i.run_id
        LEFT JOIN hw ON a.run_id = hw.run_id
        LEFT JOIN core ON a.run_id = core.run_id
        LEFT JOIN chat ON a.run_id = chat.run_id""",
}

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class CatalogError(ValueError):
    """A query DuckDB refused, or an export that cannot be written; one line naming the problem and the fix."""


def default_cache_path(store: Store) -> Path:
    """`$CHATFORGE_HOME/catalog/<sha of the store>.duckdb` (~/.cache/chatforge when CHATFORGE_HOME is unset or remote)."""
    home = os.environ.get("CHATFORGE_HOME") or DEFAULT_ROOT
    if "://" in home:
        home = home[len("file://"):] if home.startswith("file://") else DEFAULT_ROOT
    return Path(home).expanduser() / "catalog" / f"{hashlib.sha256(_identity(store).encode()).hexdigest()[:16]}.duckdb"


def _identity(store: Store) -> str:
    proto = store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]
    return f"{proto}://{store.root}"


class Catalog:
    """The catalog of one store in a DuckDB database: a cache file (`path`), or memory (`path` None; `note`
    says why when a file was asked for). `.con` serves one thread; other threads take `.cursor()`."""

    def __init__(self, store: Store | str | None, path: Path | str | None = None):
        self.store = store if isinstance(store, Store) else Store(store)
        self.path: Path | None = Path(path) if path is not None else None
        self.note = ""
        self.con = self._open()
        lock_key = str(self.path) if self.path is not None else f"memory:{id(self)}"
        with _locks_guard:
            self._lock = _locks.setdefault(lock_key, threading.Lock())
        with self._lock:
            self._schema()

    # ------------------------------------------------------------------ opening
    def _open(self) -> duckdb.DuckDBPyConnection:
        if self.path is None:
            return duckdb.connect(":memory:")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return self._memory(f"cache directory {self.path.parent} is not writable ({e.strerror or e})")
        for attempt in range(2):
            try:
                con = duckdb.connect(str(self.path))
            except duckdb.Error as e:
                if "lock" in str(e).lower():  # another process (a second dashboard, an export) holds the file
                    return self._memory(f"cache {self.path} is in use by another process")
                if attempt == 0 and self._remove():  # a damaged cache or one from another DuckDB: rebuild it
                    continue
                return self._memory(f"cache {self.path} cannot be opened ({str(e).splitlines()[0]})")
            if self._version(con) in (None, f"{VERSION} {_identity(self.store)}"):
                return con
            con.close()  # another layout, or another store's cache at this path: start over
            if not self._remove():
                return self._memory(f"cache {self.path} is outdated and cannot be replaced")
        return self._memory(f"cache {self.path} cannot be opened")

    def _memory(self, why: str) -> duckdb.DuckDBPyConnection:
        self.note, self.path = f"{why}; using an in-memory catalog", None
        return duckdb.connect(":memory:")

    def _remove(self) -> bool:
        try:
            for p in (self.path, Path(f"{self.path}.wal")):
                p.unlink(missing_ok=True)
            return True
        except OSError:
            return False

    @staticmethod
    def _version(con) -> str | None:
        try:
            return con.execute("SELECT value FROM catalog_meta WHERE name = 'version'").fetchone()[0]
        except (duckdb.Error, TypeError):
            return None  # a new file

    def _schema(self) -> None:
        con = self.con
        con.execute("CREATE TABLE IF NOT EXISTS catalog_meta (name VARCHAR, value VARCHAR)")
        con.execute("CREATE TABLE IF NOT EXISTS catalog_files (path VARCHAR, kind VARCHAR, sig VARCHAR, reason VARCHAR)")
        for kind, table in RAW.items():
            cols = ", ".join(f'"{c}" {t}' for c, (t, _) in {"path": ("VARCHAR", None), **cf.COLUMNS[kind]}.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({cols})")
        # the staleness rule of ledger.py, with this process's heartbeat interval (it takes `now`: tests give one)
        con.execute(ledger.status_macro("ledger_status"))
        for name, sql in _VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
        if self._version(con) is None:
            con.execute("INSERT INTO catalog_meta VALUES ('version', ?)", [f"{VERSION} {_identity(self.store)}"])

    # ------------------------------------------------------------------ refreshing
    def refresh(self) -> "Catalog":
        """Read the files added or changed since the last refresh; drop the rows of files that are gone."""
        with self._lock:
            listed = cf.listing(self.store)
            known = dict(self.con.execute("SELECT path, sig FROM catalog_files").fetchall())
            new = [p for p, (_, sig) in listed.items() if known.get(p) != sig]
            gone = [p for p, sig in known.items() if p not in listed or listed[p][1] != sig]
            if not new and not gone:
                return self
            data = cf.read(self.store, new)
            rows: dict[str, list[tuple]] = {kind: [] for kind in cf.KINDS}  # refs: checked, no rows
            files: list[tuple] = []
            for p in new:
                kind, sig = listed[p]
                raw = data.get(p)
                if raw is None or isinstance(raw, FileNotFoundError):
                    continue  # gone since the listing: nothing to read, nothing to remember
                if isinstance(raw, OSError):
                    # a read error may pass (permissions, network): an empty signature retries it next time
                    files.append((p, kind, "", f"cannot be read ({raw.strerror or raw})"))
                    continue
                try:
                    rows[kind] += cf.parse(kind, p, raw)
                    files.append((p, kind, sig, None))
                except cf.Unreadable as e:
                    files.append((p, kind, sig, str(e)))
            self._write(gone, rows, files)
        return self

    def _write(self, gone: list[str], rows: dict[str, list[tuple]], files: list[tuple]) -> None:
        con, tag = self.con, uuid.uuid4().hex[:8]
        con.execute("BEGIN TRANSACTION")
        try:
            if gone:
                con.register(f"_gone_{tag}", cf.pa.table({"path": cf.pa.array(gone, cf.pa.string())}))
                for table in (*RAW.values(), "catalog_files"):
                    con.execute(f"DELETE FROM {table} WHERE path IN (SELECT path FROM _gone_{tag})")
                con.unregister(f"_gone_{tag}")
            for kind, table in RAW.items():
                if rows[kind]:
                    con.register(f"_new_{tag}", cf.arrow(kind, rows[kind]))
                    con.execute(f"INSERT INTO {table} SELECT * FROM _new_{tag}")
                    con.unregister(f"_new_{tag}")
            if files:
                con.register(f"_files_{tag}", cf.pa.table(list(zip(*files)), names=["path", "kind", "sig", "reason"]))
                con.execute(f"INSERT INTO catalog_files SELECT * FROM _files_{tag}")
                con.unregister(f"_files_{tag}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ reading
    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every store file the catalog could not read."""
        return self.con.execute("SELECT path, reason FROM skipped ORDER BY path").fetchall()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection to the same database for another thread (one DuckDB connection serves one thread)."""
        return self.con.cursor()

    def close(self) -> None:
        self.con.close()


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory catalog of the store (tables and views as in the module docstring)."""
    return Catalog(store).refresh().con


def open_catalog(store: Store | str | None, cache: Path | str | None = None) -> Catalog:
    """The store's cached catalog (default file: `default_cache_path`), refreshed."""
    store = store if isinstance(store, Store) else Store(store)
    return Catalog(store, cache if cache is not None else default_cache_path(store)).refresh()


def export(store: Store | str | None, path: Path | str, cache: Path | str | None = None) -> dict[str, int]:
    """Materialize every table and view into a DuckDB file at `path` (replaced atomically); rows per table."""
    dest = Path(path).expanduser().resolve()
    if not dest.parent.is_dir():
        raise CatalogError(f"cannot write {dest}: directory {dest.parent} does not exist (create it or choose another path)")
    cat = open_catalog(store, cache)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    alias = f"export_{uuid.uuid4().hex[:8]}"
    con = cat.cursor()
    try:
        con.execute(f"ATTACH '{str(tmp).replace(chr(39), chr(39) * 2)}' AS {alias}")
        counts = {}
        for name in EXPORTED:
            con.execute(f"CREATE TABLE {alias}.{name} AS SELECT * FROM main.{name}")
            counts[name] = con.execute(f"SELECT count(*) FROM {alias}.{name}").fetchone()[0]
        con.execute(f"DETACH {alias}")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
        raise
    finally:
        con.close()
        cat.close()
    return counts


def query(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """Run SQL on a catalog and render the result as DuckDB prints it ('' for a statement without rows);
    DuckDB's multi-line errors become one CatalogError line."""
    try:
        rel = con.sql(sql)
        return "" if rel is None else str(rel)
    except duckdb.Error as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        head = " ".join(ln for ln in lines if not ln.startswith("LINE ") and set(ln) != {"^"})
        raise CatalogError(f"query failed: {head}; the tables are {', '.join(sorted(EXPORTED))} "
                           "(`describe runs` lists a table's columns)") from None


def json_value(v):
    """A JSON column's value: DuckDB hands JSON over as text; text that is not JSON is returned as it is."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v
