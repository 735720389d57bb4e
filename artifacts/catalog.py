"""DuckDB over the store's files: tables `artifacts`, `stage_runs`, `runs` and `evals`.

In-memory and rebuilt on demand: the JSON files in the store are the truth, DuckDB only reads them.
"""
from __future__ import annotations

import duckdb

from .store import Store

_STAGE_RUN_COLUMNS = {
    "run_id": "VARCHAR", "stage": "VARCHAR", "key": "VARCHAR", "cache_hit": "BOOLEAN",
    "start": "TIMESTAMPTZ", "end": "TIMESTAMPTZ", "wall_seconds": "DOUBLE", "device_type": "VARCHAR",
    "devices": "INTEGER", "nodes": "INTEGER", "device_hours": "DOUBLE", "price_per_device_hour": "DOUBLE",
    "cost_usd": "DOUBLE", "status": "VARCHAR", "preset": "VARCHAR", "error": "VARCHAR", "metrics": "JSON",
}
_ARTIFACT_COLUMNS = {
    "key": "VARCHAR", "kind": "VARCHAR", "stage": "VARCHAR", "created": "TIMESTAMPTZ", "host": "VARCHAR",
    "wall_seconds": "DOUBLE", "config": "JSON", "parents": "JSON", "metrics": "JSON", "files": "JSON", "code": "JSON",
}
_RUN_COLUMNS = {"run_id": "VARCHAR", "preset": "VARCHAR", "started": "TIMESTAMPTZ", "host": "VARCHAR", "config": "JSON"}
# evals.json of an eval artifact: one row per (task, metric); suite names what the task belongs to
# ("CORE-18 (partial)", "ChatCORE", "bpb"); a task that did not run has status "not run: data unavailable"
_EVAL_COLUMNS = {"suite": "VARCHAR", "task": "VARCHAR", "metric": "VARCHAR", "value": "DOUBLE", "n": "INTEGER",
                 "status": "VARCHAR"}


def connect(store: Store) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    if not store.local:
        con.register_filesystem(store.fs)
    _table(con, store, "artifacts", store._p("artifacts", "*", "manifest.json"), _ARTIFACT_COLUMNS)
    _table(con, store, "stage_runs", store._p("ledger", "*", "*.json"), _STAGE_RUN_COLUMNS)
    _table(con, store, "run_info", store._p("runs", "*.json"), _RUN_COLUMNS)
    _table(con, store, "eval_rows", store._p("artifacts", "*", "evals.json"), _EVAL_COLUMNS, filename=True)
    con.execute(
        """
        CREATE VIEW evals AS
        SELECT a.key, a.stage, a.created, e.suite, e.task, e.metric, e.value, e.n, e.status
        FROM eval_rows e JOIN artifacts a ON regexp_extract(e.filename, '([0-9a-f]{64})[/\\\\]evals\\.json$', 1) = a.key
        """
    )
    # final_score: the headline score of the run's last stage that reports one (none before eval stages exist)
    con.execute(
        """
        CREATE VIEW runs AS
        SELECT s.run_id,
               any_value(i.preset) AS preset,
               min(s.start) AS started,
               max(s."end") AS finished,
               sum(s.wall_seconds) AS wall_seconds,
               sum(s.cost_usd) AS cost_usd,
               sum(s.device_hours) AS device_hours,
               count(*) AS stage_executions,
               count(*) FILTER (WHERE s.cache_hit) AS cache_hits,
               count(*) FILTER (WHERE s.status = 'failed') AS failures,
               arg_max(CAST(s.metrics->>'score' AS DOUBLE), s."end") FILTER (WHERE s.metrics->>'score' IS NOT NULL) AS final_score
        FROM stage_runs s LEFT JOIN run_info i USING (run_id)
        GROUP BY s.run_id
        """
    )
    return con


def _table(con, store: Store, name: str, pattern: str, columns: dict[str, str], filename: bool = False) -> None:
    cols = ", ".join(f'"{c}" {t}' for c, t in {**columns, **({"filename": "VARCHAR"} if filename else {})}.items())
    try:
        found = store.fs.glob(pattern)
    except FileNotFoundError:
        found = []
    if not found:
        con.execute(f"CREATE TABLE {name} ({cols})")
        return
    url = pattern if store.local else f"{_protocol(store)}://{pattern.lstrip('/')}"
    spec = "{" + ", ".join(f"'{c}': '{t}'" for c, t in columns.items()) + "}"
    extra = ", filename=true" if filename else ""
    con.execute(f"CREATE TABLE {name} AS SELECT * FROM read_json('{url}', columns={spec}, format='auto'{extra})")


def _protocol(store: Store) -> str:
    p = store.fs.protocol
    return p if isinstance(p, str) else p[0]
