"""What the dashboard pages show, as DataFrames from the catalog (`artifacts.catalog`): no Streamlit here.

Every function takes a DuckDB connection with the catalog's tables and views (`runs`, `stage_runs`,
`artifacts`, `run_info`, `evals`); the triple of a run is the catalog's `runs` view, never recomputed
here. Curves are the one thing read from artifact files (curve.json), through the store.
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

from artifacts.catalog import json_value
from artifacts.store import Store

# A stage's result as the pages name it (and color it): a cache hit cost nothing and saved what computing cost.
COMPUTED, CACHED, FAILED = "computed", "cache hit", "failed"
INTERRUPTED, RUNNING = "interrupted", "running"  # a killed attempt (its heartbeat stopped), one in progress
CHECKPOINT_STAGES = ("rl", "sft", "mid", "base")  # what the chat page offers, newest training stage first


def _df(con, sql: str, params: list | None = None) -> pd.DataFrame:
    return con.execute(sql, params or []).df()


_json = json_value


# ---------------------------------------------------------------- runs

RUN_COLUMNS = """run_id, preset, host, hardware, device_types, started, finished, wall_clock_seconds, stage_seconds,
                 cost_usd, saved_usd, stage_executions, cache_hits, failures, core_name, core, chat_stage, chat_name,
                 chat_score, score_name, score, interrupted"""


def runs(con) -> pd.DataFrame:
    """Every run's triple, newest first (the catalog's `runs` view)."""
    return _df(con, f"SELECT {RUN_COLUMNS} FROM runs ORDER BY started DESC NULLS LAST, run_id")


def run(con, run_id: str) -> dict | None:
    """One run's triple, or None when the store has no run with this id."""
    df = _df(con, f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", [run_id])
    return None if df.empty else df.iloc[0].to_dict()


def find_run(con, text: str) -> str | None:
    """The run id that `text` names: the full id or a unique prefix (as the pages show 8 characters)."""
    ids = [r[0] for r in con.execute("SELECT run_id FROM runs WHERE starts_with(run_id, ?)", [text.strip()]).fetchall()]
    return ids[0] if len(ids) == 1 else None


def filter_runs(df: pd.DataFrame, presets: list[str] | None = None, device_types: list[str] | None = None,
                dates: tuple | None = None) -> pd.DataFrame:
    """The runs of the chosen presets, that used one of the chosen device types, started within `dates`
    (an inclusive (first, last) pair of dates, in UTC). None or empty: no filter on that column."""
    keep = pd.Series(True, index=df.index)
    if presets:
        keep &= df["preset"].isin(presets)
    if device_types:
        wanted = set(device_types)
        keep &= df["device_types"].map(lambda ts: bool(wanted & set(_items(ts))))
    if dates and len(dates) == 2 and df["started"].notna().any():
        day = pd.to_datetime(df["started"], utc=True).dt.date
        keep &= (day >= dates[0]) & (day <= dates[1])
    return df[keep]


def device_types(df: pd.DataFrame) -> list[str]:
    return sorted({t for ts in df["device_types"] for t in _items(ts)})


def _items(v: Any) -> list:
    """A DuckDB list cell as a Python list (a run of cache hits only has no device types: NULL)."""
    return list(v) if isinstance(v, (list, tuple)) or hasattr(v, "__array__") else []


def frontier(df: pd.DataFrame) -> pd.DataFrame:
    """The Pareto frontier of dollars against score, per score name (CORE and ChatCORE are not one scale, and
    neither are a full and a partial suite): the scored runs that no other run beats on both, i.e. none costs
    as little or less with a score as high or higher (and one of the two strictly). Sorted by cost."""
    scored = df[df["score"].notna() & df["cost_usd"].notna()]
    out = []
    for _, group in scored.groupby("score_name", dropna=False):
        best = None
        # cheapest first; among equal costs the best score first, so that a tie on cost keeps only the best
        for _, row in group.sort_values(["cost_usd", "score"], ascending=[True, False]).iterrows():
            if best is None or row["score"] > best:
                out.append(row)
                best = row["score"]
    return pd.DataFrame(out, columns=df.columns).sort_values("cost_usd") if out else df.iloc[0:0]


# ---------------------------------------------------------------- one run

def stages(con, run_id: str) -> pd.DataFrame:
    """The run's ledger rows in the order they started: result (computed / cache hit / failed / interrupted /
    running; an interrupted attempt's wall time runs to its last heartbeat), wall seconds
    and hours, device-hours, dollars spent and (for a cache hit) saved, device, the price and its source."""
    df = _df(con, """
        SELECT stage, key, cache_hit, status, start, "end", wall_seconds, wall_seconds / 3600 AS hours, device_hours,
               cost_usd, saved_usd, device_type, devices * nodes AS device_count, price_per_device_hour, price_source, error
        FROM stage_runs WHERE run_id = ? ORDER BY start, "end" """, [run_id])
    df.insert(1, "result", [s if s in (FAILED, INTERRUPTED, RUNNING) else CACHED if hit else COMPUTED
                            for s, hit in zip(df["status"], df["cache_hit"])])
    return df


def lineage(con, run_id: str) -> pd.DataFrame:
    """Each artifact the run used or made: stage, key, kind, created, its parents (stage → key) and the run
    that computed it (the first completed, non-cached ledger row for its key, in any run)."""
    df = _df(con, """
        WITH used AS (SELECT stage, key, min(start) AS first FROM stage_runs
                      WHERE run_id = ? AND status = 'completed' GROUP BY stage, key),
             made AS (SELECT key, arg_min(run_id, "end") AS computed_by, min("end") AS computed_at FROM stage_runs
                      WHERE NOT cache_hit AND status = 'completed' GROUP BY key)
        SELECT u.stage, u.key, a.kind, a.created, a.parents, m.computed_by, m.computed_at
        FROM used u LEFT JOIN artifacts a ON a.key = u.key LEFT JOIN made m ON m.key = u.key
        ORDER BY u.first""", [run_id])
    df["parents"] = [_json(p) or {} for p in df["parents"]]
    return df


def lineage_dot(df: pd.DataFrame, run_id: str) -> str:
    """The lineage as a Graphviz digraph: a node per artifact (stage, short key, who computed it), parent → child."""
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname="sans-serif", fontsize=10];']
    for row in df.itertuples():
        by = "this run" if row.computed_by == run_id else f"run {str(row.computed_by)[:8]}" if row.computed_by else "not in the ledger"
        color = "#dbeafe" if row.computed_by == run_id else "#f1f5f9"
        lines.append(f'  "{row.key}" [label="{row.stage}\\n{row.key[:12]}\\n{by}", fillcolor="{color}"];')
        for parent in (row.parents or {}).values():
            lines.append(f'  "{parent}" -> "{row.key}";')
    known = set(df["key"])
    for row in df.itertuples():  # a parent the run did not touch (possible for `chatforge stage`) still gets a node
        for stage, parent in (row.parents or {}).items():
            if parent not in known:
                known.add(parent)
                lines.append(f'  "{parent}" [label="{stage}\\n{parent[:12]}", fillcolor="#ffffff"];')
    return "\n".join(lines + ["}"])


def curve_files(con, run_id: str) -> pd.DataFrame:
    """The run's completed artifacts that carry a curve.json (training stages), in the order they ran."""
    return _df(con, """
        SELECT s.stage, s.key FROM stage_runs s JOIN artifacts a ON a.key = s.key
        WHERE s.run_id = ? AND s.status = 'completed' AND json_exists(a.files, '$."curve.json"')
        GROUP BY s.stage, s.key ORDER BY min(s.start)""", [run_id])


def curves(store: Store, con, run_id: str) -> pd.DataFrame:
    """Long-form points (stage, series, step, value) of the run's training curves: train loss, validation loss /
    bits per byte, RL mean reward and pass@k. A curve file that cannot be read is skipped (the page says so)."""
    rows: list[tuple] = []
    for stage, key in curve_files(con, run_id).itertuples(index=False):
        try:
            with store.fs.open(store._p("artifacts", key, "curve.json"), "rb") as f:
                doc = json.loads(f.read())
        except (OSError, ValueError):
            continue
        rows += curve_points(stage, doc)
    return pd.DataFrame(rows, columns=["stage", "series", "step", "value"])


# curve.json layouts (model/train/*.py): {"train": {"step": [...], "<metric>": [...]}, "val"|"eval": [{"step", ...}]}
_SERIES = {"train_loss": "train loss", "val_bpb": "val bpb", "val_loss": "val loss", "mean_reward": "mean reward"}


def curve_points(stage: str, doc: dict) -> list[tuple]:
    out: list[tuple] = []
    if not isinstance(doc, dict):
        return out
    train = doc.get("train")
    if isinstance(train, dict) and isinstance(train.get("step"), list):
        for metric in ("train_loss", "mean_reward"):
            values = train.get(metric)
            if isinstance(values, list):
                out += [(stage, _SERIES[metric], s, v) for s, v in zip(train["step"], values) if _number(v)]
    for part in ("val", "eval"):
        points = doc.get(part)
        if isinstance(points, list):
            for p in points:
                if isinstance(p, dict) and _number(p.get("step")):
                    out += [(stage, _SERIES.get(k, k), p["step"], v) for k, v in p.items()
                            if k != "step" and (k in _SERIES or k.startswith("pass@")) and _number(v)]
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


# ---------------------------------------------------------------- two runs

def config(con, run_id: str) -> dict | None:
    """The config a run was started with (its run file), or None when it has none."""
    row = con.execute("SELECT config FROM run_info WHERE run_id = ? LIMIT 1", [run_id]).fetchone()
    return _json(row[0]) if row else None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted names; lists stay whole values (a mixture is one setting)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, name) if isinstance(v, dict) and v else {name: v})
    return out


# Settings that name the run itself (the report card's run): they differ between any two runs and say nothing.
OWN_ID = {"report.run_id"}


def config_diff(con, a: str, b: str) -> pd.DataFrame:
    """The settings that differ between two runs' configs (dotted name, value in A, value in B)."""
    fa, fb = flatten(config(con, a) or {}), flatten(config(con, b) or {})
    rows = [(k, _show(fa.get(k, "—")), _show(fb.get(k, "—"))) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and k not in OWN_ID]
    return pd.DataFrame(rows, columns=["setting", "A", "B"])


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def stage_compare(con, a: str, b: str) -> pd.DataFrame:
    """Per stage, side by side: result, wall seconds and dollars in A and in B. A stage executed more than once in
    a run (a retry after a failure) is summed, and its result is how it ended, with the failed and interrupted
    attempts before it."""
    df = _df(con, """
        SELECT run_id, stage, min(start) AS first, sum(wall_seconds) AS wall_seconds, sum(cost_usd) AS cost_usd,
               CASE WHEN bool_or(status = 'completed' AND NOT cache_hit) THEN 'computed'
                    WHEN bool_or(status = 'completed') THEN 'cache hit'
                    WHEN bool_or(status = 'running') THEN 'running'
                    WHEN bool_or(status = 'failed') THEN 'failed' ELSE 'interrupted' END
               || CASE WHEN bool_or(status IN ('completed', 'running')) AND bool_or(status IN ('failed', 'interrupted'))
                       THEN ' after ' || concat_ws(', ',
                            CASE WHEN bool_or(status = 'failed') THEN count(*) FILTER (WHERE status = 'failed') || ' failed' END,
                            CASE WHEN bool_or(status = 'interrupted') THEN count(*) FILTER (WHERE status = 'interrupted') || ' interrupted' END)
                       ELSE '' END AS result
        FROM stage_runs WHERE run_id IN (?, ?) GROUP BY run_id, stage""", [a, b])
    order = df.sort_values("first").drop_duplicates("stage")["stage"].tolist()
    wide = {}
    for side, rid in (("A", a), ("B", b)):
        part = df[df["run_id"] == rid].set_index("stage")
        for col in ("result", "wall_seconds", "cost_usd"):
            wide[f"{col} {side}"] = part[col].reindex(order)
    out = pd.DataFrame(wide, index=pd.Index(order, name="stage")).reset_index()
    return out[["stage", "result A", "result B", "wall_seconds A", "wall_seconds B", "cost_usd A", "cost_usd B"]]


def eval_compare(con, a: str, b: str) -> pd.DataFrame:
    """Per eval stage, suite, task and metric: the value each run's eval artifacts report in A and B (None where a
    run has none), B − A, and a note with the status of a task that did not run ("not run: data unavailable")."""
    df = _df(con, """
        WITH used AS (SELECT DISTINCT run_id, stage, key FROM stage_runs WHERE run_id IN (?, ?) AND status = 'completed')
        SELECT u.run_id, u.stage, e.suite, e.task, e.metric, e.value, e.status
        FROM used u JOIN evals e ON e.key = u.key""", [a, b])
    cols = ["stage", "suite", "task", "metric", "A", "B", "B − A", "note"]
    table: dict[tuple, dict[str, Any]] = {}
    for rid, stage, suite, task, metric, v, status in df.itertuples(index=False):
        shown = float(v) if _number(v) else status
        if shown is not None:
            table.setdefault((stage, suite, task, metric), {})[rid] = shown
    rows = []
    for (stage, suite, task, metric), by_run in table.items():
        x, y = by_run.get(a), by_run.get(b)
        notes = {side: v for side, v in (("A", x), ("B", y)) if isinstance(v, str)}
        note = next(iter(notes.values())) if len(set(notes.values())) == 1 and len(notes) == 2 else \
            "; ".join(f"{side}: {v}" for side, v in notes.items())
        x, y = (v if _number(v) else None for v in (x, y))
        rows.append((stage, suite, task, metric, x, y, y - x if x is not None and y is not None else None, note))
    # per eval stage and suite: its headline first, then the tasks that ran, then those that did not
    rows.sort(key=lambda r: (r[0], r[1], r[2] != r[1], bool(r[7]), r[2], r[3]))
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- checkpoints

def checkpoints(con) -> pd.DataFrame:
    """The checkpoint artifacts a person can chat with (base, mid, sft, rl), newest training stage first,
    then newest first; with the run that computed each."""
    order = ", ".join(f"'{s}'" for s in CHECKPOINT_STAGES)
    return _df(con, f"""
        WITH made AS (SELECT key, arg_min(run_id, "end") AS run_id FROM stage_runs
                      WHERE NOT cache_hit AND status = 'completed' GROUP BY key)
        SELECT a.stage, a.key, a.created, m.run_id
        FROM artifacts a LEFT JOIN made m ON m.key = a.key
        WHERE a.kind = 'checkpoint' AND a.stage IN ({order})
        ORDER BY list_position([{order}], a.stage), a.created DESC""")
