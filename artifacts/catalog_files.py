"""The store files the catalog reads, and how each becomes table rows.

Five kinds of small JSON files, each replaced whole when it changes (which changes its size/mtime
signature): ledger rows, run files, manifests, evals.json and refs. Every file is parsed and type-checked
here, one at a time, so that one truncated or hand-edited file is skipped with a reason instead of failing
the whole catalog (DuckDB's read_json over a glob stops at the first). Refs contribute no rows: they are
read only so that a damaged one is listed in `skipped` with the rest.
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import PurePosixPath

import pyarrow as pa

from .errors import StoreError
from .manifest import SCHEMA as MANIFEST_SCHEMA
from .store import Store, Unreadable, load_json, ref_key

# Columns of the raw tables, in order (each also has a leading `path`: the file a row came from, so that
# a file that disappears or changes takes its rows with it). Values: (DuckDB type, default); REQUIRED
# means a file without it is skipped; DERIVED is computed from other columns when absent.
REQUIRED, DERIVED = object(), object()
COLUMNS: dict[str, dict[str, tuple[str, object]]] = {
    "ledger": {
        "run_id": ("VARCHAR", REQUIRED), "stage": ("VARCHAR", REQUIRED), "key": ("VARCHAR", REQUIRED),
        "cache_hit": ("BOOLEAN", REQUIRED), "start": ("TIMESTAMPTZ", REQUIRED), "end": ("TIMESTAMPTZ", REQUIRED),
        "wall_seconds": ("DOUBLE", DERIVED), "device_type": ("VARCHAR", "cpu"), "devices": ("INTEGER", 1),
        "nodes": ("INTEGER", 1), "device_hours": ("DOUBLE", DERIVED), "price_per_device_hour": ("DOUBLE", 0.0),
        "cost_usd": ("DOUBLE", DERIVED), "status": ("VARCHAR", "completed"), "preset": ("VARCHAR", ""),
        "error": ("VARCHAR", ""), "metrics": ("JSON", {}), "price_source": ("VARCHAR", None),
    },
    "manifest": {
        "key": ("VARCHAR", REQUIRED), "kind": ("VARCHAR", REQUIRED), "stage": ("VARCHAR", REQUIRED),
        "created": ("TIMESTAMPTZ", None), "host": ("VARCHAR", ""), "wall_seconds": ("DOUBLE", None),
        "config": ("JSON", {}), "parents": ("JSON", {}), "metrics": ("JSON", {}), "files": ("JSON", {}), "code": ("JSON", {}),
    },
    "run": {
        "run_id": ("VARCHAR", DERIVED), "preset": ("VARCHAR", ""), "started": ("TIMESTAMPTZ", None),
        "host": ("VARCHAR", ""), "config": ("JSON", {}), "flow_run_name": ("VARCHAR", None),
        "env": ("JSON", None),  # the machine and package versions the flow recorded at its start (tasks/report.py)
    },
    # evals.json of an eval artifact: one row per (task, metric); suite names what the task belongs to
    # ("CORE-18 (partial)", "ChatCORE", "bpb"); a task that did not run has status "not run: data unavailable"
    "evals": {
        "key": ("VARCHAR", DERIVED), "suite": ("VARCHAR", None), "task": ("VARCHAR", None), "metric": ("VARCHAR", None),
        "value": ("DOUBLE", None), "n": ("INTEGER", None), "status": ("VARCHAR", None),
    },
}
_ARROW = {"VARCHAR": pa.string(), "JSON": pa.string(), "BOOLEAN": pa.bool_(), "DOUBLE": pa.float64(),
          "INTEGER": pa.int32(), "TIMESTAMPTZ": pa.timestamp("us", tz="UTC")}
_INT_MAX = 2**31 - 1


# Unreadable (from store.py): why a file was skipped; it becomes a row of the `skipped` table.
KINDS = (*COLUMNS, "ref")  # what listing() finds; a ref is checked but contributes no rows


# ---------------------------------------------------------------- finding the files

def listing(store: Store) -> dict[str, tuple[str, str]]:
    """Every catalog file in the store: path -> (kind, signature). The signature (size and mtime, or what
    the object store reports) changes when a file is replaced, so a refresh re-reads exactly those."""
    if store.local:
        return _scan_local(store.root)
    patterns = {"ledger": ("ledger", "*", "*.json"), "run": ("runs", "*.json"),
                "manifest": ("artifacts", "*", "manifest.json"), "evals": ("artifacts", "*", "evals.json"),
                "ref": ("refs", "*", "*.json")}
    out: dict[str, tuple[str, str]] = {}
    for kind, parts in patterns.items():
        try:
            found = store.fs.glob(store._p(*parts), detail=True)
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - no network, no credentials, no bucket: say so in one line
            raise StoreError(f"store {store.url} cannot be listed ({type(e).__name__}: {' '.join(str(e).split())[:200]}): "
                             "check the URL, the credentials and the network") from None
        for path, info in found.items():
            if info.get("type", "file") == "file":
                stamp = next((info[k] for k in ("mtime", "LastModified", "ETag", "etag", "md5", "created") if info.get(k)), "")
                out[path] = (kind, f"{info.get('size')}:{stamp}")
    return out


def _scan_local(root: str) -> dict[str, tuple[str, str]]:
    """os.scandir instead of a glob: 10,000 ledger rows are listed with their stat in tens of milliseconds."""
    out: dict[str, tuple[str, str]] = {}

    def add(path: str, kind: str, entry: os.DirEntry | None = None) -> None:
        try:
            st = entry.stat() if entry is not None else os.stat(path)
        except OSError:
            return  # gone since the directory was read
        out[path] = (kind, f"{st.st_size}:{st.st_mtime_ns}")

    for run_dir in _entries(f"{root}/ledger"):
        if run_dir.is_dir():
            for f in _entries(run_dir.path):
                if f.name.endswith(".json"):  # a row being written is `<name>.json.<nonce>.tmp`
                    add(f.path, "ledger", f)
    for f in _entries(f"{root}/runs"):
        if f.name.endswith(".json"):
            add(f.path, "run", f)
    for d in _entries(f"{root}/artifacts"):
        if d.is_dir():
            add(f"{d.path}/manifest.json", "manifest")
            add(f"{d.path}/evals.json", "evals")
    for stage_dir in _entries(f"{root}/refs"):
        if stage_dir.is_dir():
            for f in _entries(stage_dir.path):
                if f.name.endswith(".json"):
                    add(f.path, "ref", f)
    return out


def _entries(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []  # nothing there yet (or removed while listing)
    except OSError as e:
        raise StoreError(f"store directory {path} cannot be listed ({e.strerror or e}): fix its permissions or "
                         "choose another store with --store / CHATFORGE_HOME") from None


def read(store: Store, paths: list[str]) -> dict[str, bytes | OSError]:
    """The bytes of each file, or the error reading it (object stores fetch them concurrently)."""
    if not paths:
        return {}
    if store.local:
        out: dict[str, bytes | OSError] = {}
        for p in paths:
            try:
                with open(p, "rb") as f:
                    out[p] = f.read()
            except OSError as e:
                out[p] = e
        return out
    got = store.fs.cat(paths, on_error="return")
    by_name = {store.fs._strip_protocol(k): v for k, v in got.items()}
    return {p: by_name.get(store.fs._strip_protocol(p), FileNotFoundError(p)) for p in paths}


# ---------------------------------------------------------------- parsing

def parse(kind: str, path: str, raw: bytes) -> list[tuple]:
    """The rows one file contributes to its kind's table (`path` first), or Unreadable(reason)."""
    if kind == "ref":
        ref_key(raw)
        return []
    doc = load_json(raw)
    parts = PurePosixPath(path).parts
    if kind == "evals":
        if not isinstance(doc, list):
            raise Unreadable(f"expected a list of eval rows, got {_kind(doc)}")
        rows = []
        for i, item in enumerate(doc):
            if not isinstance(item, dict):
                raise Unreadable(f"row {i}: expected an object, got {_kind(item)}")
            rows.append((path, *_typed("evals", {**item, "key": parts[-2]}, f"row {i}: ").values()))
        return rows
    if not isinstance(doc, dict):
        raise Unreadable(f"expected a JSON object, got {_kind(doc)}")
    if kind == "manifest":
        if doc.get("schema") != MANIFEST_SCHEMA:
            raise Unreadable(f"manifest schema {doc.get('schema')!r}, expected {MANIFEST_SCHEMA}")
        if doc.get("key") != parts[-2]:
            raise Unreadable(f"manifest names key {str(doc.get('key'))[:12]!r}, its directory is {parts[-2][:12]}")
    if kind == "run":
        doc = {**doc, "run_id": doc.get("run_id") or parts[-1][: -len(".json")]}
    row = _typed(kind, doc)
    if kind == "ledger":
        if row["wall_seconds"] is None:
            row["wall_seconds"] = (row["end"] - row["start"]).total_seconds()
        if row["device_hours"] is None:
            row["device_hours"] = 0.0 if row["cache_hit"] else row["wall_seconds"] / 3600 * row["devices"] * row["nodes"]
        if row["cost_usd"] is None:
            row["cost_usd"] = row["device_hours"] * row["price_per_device_hour"]
    return [(path, *row.values())]


def _typed(kind: str, doc: dict, where: str = "") -> dict:
    row = {}
    for name, (typ, default) in COLUMNS[kind].items():
        value = doc.get(name)
        if value is None:
            if default is REQUIRED:
                raise Unreadable(f"{where}missing {name}")
            row[name] = None if default is DERIVED or default is None else _convert(default, typ, name, where)
        else:
            row[name] = _convert(value, typ, name, where)
    return row


def _convert(value, typ: str, name: str, where: str):
    def bad(expected: str) -> Unreadable:
        return Unreadable(f"{where}{name}: expected {expected}, got {json.dumps(value, default=str)[:60]}")

    if typ == "VARCHAR":
        if not isinstance(value, str):
            raise bad("text")
        return value
    if typ == "BOOLEAN":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if typ == "DOUBLE":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if typ == "INTEGER":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or int(value) != value \
                or abs(value) > _INT_MAX:
            raise bad("an integer")
        return int(value)
    if typ == "TIMESTAMPTZ":
        if value == "":
            return None
        try:
            t = datetime.fromisoformat(value)
        except (TypeError, ValueError):
            raise bad("an ISO 8601 time") from None
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    if typ == "JSON":
        if not isinstance(value, (dict, list)):
            raise bad("an object")
        return json.dumps(_finite(value), separators=(",", ":"))
    raise AssertionError(typ)


def _finite(v):
    """JSON has no NaN/Infinity (a diverged loss is one): DuckDB's JSON type rejects them, so they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "text", type(None): "null"}.get(type(v), type(v).__name__)


def arrow(kind: str, rows: list[tuple]) -> pa.Table:
    """Rows of one kind as an Arrow table in its DuckDB table's column order (the fast way into DuckDB)."""
    names = ["path", *COLUMNS[kind]]
    types = [pa.string(), *(_ARROW[t] for t, _ in COLUMNS[kind].values())]
    cols = list(zip(*rows)) if rows else [[] for _ in names]
    return pa.table([pa.array(list(c), type=t) for c, t in zip(cols, types)], names=names)
