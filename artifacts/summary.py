"""Readable summaries of what the store holds: one artifact (`chatforge artifacts show`) and one run (the
last thing `chatforge run` prints).

Everything comes from the store: manifests, refs, an artifact's small report files, and the ledger rows of
a run through the DuckDB catalog. Nothing is re-measured, and nothing here knows a stage by name: stages
are listed from the ledger, scores from any artifact whose metrics carry `score_name`/`score` (and
`val_bpb`), missing eval data from the `evalset` parents' `sets.json`. No torch, no Prefect.
"""
from __future__ import annotations

import json
import re
import shlex
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .manifest import Manifest
from .store import Store

WIDTH = 100
SHOW_MAX_BYTES = 1 << 20  # report files larger than this are listed, not printed
LIST_MAX = 12  # list metrics longer than this are cut, saying how many more there are
# results of an attempt that made no artifact: the key's artifact, if any, is another attempt's
UNFINISHED = ("failed", "interrupted", "running")
NOT_RUN = "not run: data unavailable"  # the status eval artifacts give a task without data (model/evals/core_tasks.py)


# ---------------------------------------------------------------- formatting

def seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} m {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} m"


def size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def dollars(x: float | None) -> str:
    return f"${x or 0.0:,.2f}"


def value(v: Any) -> str:
    """One metric value, readable: 4 decimals, thousands separators, lists cut at LIST_MAX items."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0 or v != v:
            return f"{v:g}"
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        return f"{v:.4f}" if abs(v) >= 1e-3 else f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        shown = ", ".join(value(x) if not isinstance(x, (dict, list)) else json.dumps(x, separators=(",", ":")) for x in v[:LIST_MAX])
        return shown + (f", … (+{len(v) - LIST_MAX} more)" if len(v) > LIST_MAX else "")
    if isinstance(v, dict):
        return "none" if not v else json.dumps(v, separators=(",", ":"))
    return str(v)


def flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted names (`compression.sources.train.ours`); lists of dicts as `name[i].field`."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += flatten(v, name + ".")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v[:LIST_MAX]):
                out += flatten(x, f"{name}[{i}].")
            if len(v) > LIST_MAX:
                out.append((f"{name}[…]", f"+{len(v) - LIST_MAX} more"))
        else:
            out.append((name, v))
    return out


def _pairs(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    """`name  value` lines with the names in one column, long values wrapped under themselves."""
    if not rows:
        return []
    w = min(max(len(k) for k, _ in rows), 48)
    lines = []
    for k, v in rows:
        head = f"{indent}{k:<{w}}  "
        body = textwrap.wrap(v, max(40, WIDTH - len(head)), break_on_hyphens=False, break_long_words=False) or [""]
        lines.append(head + body[0])
        lines += [" " * len(head) + b for b in body[1:]]
    return lines


def _rule(title: str) -> str:
    return f"── {title} " + "─" * max(3, 64 - len(title))


def _wrap(lines: list[str], indent: str) -> list[str]:
    """Each line wrapped to WIDTH; continuation lines indented two more."""
    out = []
    for line in lines:
        out += textwrap.wrap(line, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ", break_on_hyphens=False,
                             break_long_words=False)
    return out


def suite_name(score_name: str) -> str:
    """`CORE-0 (partial)` → `CORE`: the suite a score belongs to, for saying that it did not run."""
    return re.sub(r"-\d+ \(partial\)$", "", score_name)


def headline(metrics: dict) -> list[str]:
    """The scores an artifact reports, under their real names: `CORE-18 (partial) 0.1234`, `val bpb 0.8123`."""
    out = []
    if "score_name" in metrics:
        name, score = metrics["score_name"], metrics.get("score")
        out.append(f"{suite_name(name)} {NOT_RUN}" if score is None else f"{name} {score:.4f}")
    if isinstance(metrics.get("val_bpb"), (int, float)):
        out.append(f"val bpb {metrics['val_bpb']:.4f}")
    return out


# ---------------------------------------------------------------- reading the store without side effects

def _manifest(store: Store, key: str) -> Manifest | None:
    """A manifest as written (no hashing: showing must be cheap and never quarantine anything)."""
    try:
        return Manifest.from_dict(store.read_json(store._p("artifacts", key, "manifest.json")))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _read(store: Store, m: Manifest, rel: str) -> bytes | None:
    info = m.files.get(rel)
    if info is None or info.get("size", 0) > SHOW_MAX_BYTES:
        return None
    try:
        with store.fs.open(f"{store.artifact_dir(m.key)}/{rel}", "rb") as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def _json(store: Store, m: Manifest, rel: str):
    raw = _read(store, m, rel)
    try:
        return None if raw is None else json.loads(raw)
    except ValueError:
        return None


def refs_by_key(store: Store) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ref, key in store.refs().items():
        out.setdefault(key, []).append(ref)
    return out


Hints = dict[str, str] | Callable[[], dict[str, str]] | None


def missing_data(store: Store, m: Manifest, hints: Hints = None) -> list[str]:
    """Why an eval artifact's suite is partial or did not run, from its `evalset` parents' sets.json, and
    how to supply the data (`hints`: evalset stage → how, or a function returning that, called only if needed)."""
    score_name, score = m.metrics.get("score_name"), m.metrics.get("score")
    missing = next((v for k, v in sorted(m.metrics.items()) if k.endswith("_missing") and isinstance(v, list)), [])
    if not score_name or (score is not None and not missing):
        return []
    suite = suite_name(score_name)
    lines = [f"{len(missing)} not run (data unavailable): {value(missing)}"] if score is not None else []
    for parent in m.parents.values():
        pm = _manifest(store, parent)
        if pm is None or pm.kind != "evalset":
            continue
        sets = _json(store, pm, "sets.json") or {}
        reasons: dict[str, list[str]] = {}
        for name, info in sets.items():
            if isinstance(info, dict) and info.get("status") != "ok":
                reasons.setdefault(info.get("reason") or "unavailable", []).append(name)
        if not reasons:
            continue
        why = "; ".join(reason if len(reasons) == 1 else f"{reason}: {value(names)}" for reason, names in reasons.items())
        lines.append(f"why: {pm.stage} has {'no data' if score is None else 'no data for them'} ({why})")
        if all(reason.startswith(f"{pm.stage}.") for reason in reasons):
            continue  # the reason names the setting that left the data out
        if callable(hints):
            hints = hints()
        if hints and hints.get(pm.stage):
            lines.append(f"to {'score ' + suite if score is None else 'add them'}: {hints[pm.stage]}")
    return lines


# ---------------------------------------------------------------- one artifact

def describe(store: Store, key: str, hints: Hints = None) -> str:
    """`chatforge artifacts show`: what an artifact is, where it came from, what it measured and holds."""
    m = _manifest(store, key)
    if m is None:
        m = store.get(key)  # raises the store's one-line "no artifact" error
    refs = refs_by_key(store)
    out = [f"{m.stage} · {m.kind} · {m.key}"]
    made = [f"{m.created[:19].replace('T', ' ')} UTC" if m.created else "", f"on {m.host}" if m.host else "",
            f"{seconds(m.wall_seconds)} to compute" if m.wall_seconds is not None else ""]
    code = m.code.get("version", "")
    head = [("created", " · ".join(x for x in made if x)), ("refs", ", ".join(refs.get(m.key, [])) or "none"),
            ("code", f"{code} (fingerprint {m.code.get('fingerprint', '')[:12]})" if code else "—")]
    if headline(m.metrics):
        head.append(("scores", " · ".join(headline(m.metrics))))
    out += _pairs(head)
    out += _wrap(missing_data(store, m, hints), "  ")

    out += ["", "lineage" if m.parents else "lineage  none (a source stage)"]
    for name, parent in m.parents.items():
        pm = _manifest(store, parent)
        where = ", ".join(refs.get(parent, [])) or ("not in this store" if pm is None else "no ref")
        out.append(f"  {name:<14} {parent[:12]}  {pm.kind if pm else '':<11} {where}")

    out += ["", "config"]
    out += textwrap.wrap("  ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
                                   for k, v in m.config.items()) or "none", WIDTH, initial_indent="  ", subsequent_indent="  ",
                         break_on_hyphens=False, break_long_words=False)

    metrics = flatten(m.metrics)
    out += ["", "metrics" if metrics else "metrics  none"]
    out += _pairs([(k, value(v)) for k, v in metrics])

    out += ["", f"files  {len(m.files)}, {size(m.total_bytes())}"]
    w = max((len(rel) for rel in m.files), default=0)
    out += [f"  {rel:<{w}}  {size(info['size']):>9}" for rel, info in sorted(m.files.items())]

    for section in _extras(store, m):
        out += ["", *section]
    return "\n".join(out).rstrip() + "\n"


def _extras(store: Store, m: Manifest) -> Iterable[list[str]]:
    """What an artifact's own files show: its markdown reports (eval tables, compression, decontamination),
    its eval sets, a training curve, the model's shape, generated samples."""
    for rel in sorted(r for r in m.files if r.endswith(".md")):
        raw = _read(store, m, rel)
        text = raw.decode("utf-8", "replace").strip() if raw is not None else f"({size(m.files[rel]['size'])}: see --report)"
        yield [_rule(rel), text]
    sets = _json(store, m, "sets.json") if "sets.json" in m.files else None
    if isinstance(sets, dict) and sets:
        rows = []
        for name, info in sets.items():
            if not isinstance(info, dict):
                continue
            if info.get("status") == "ok":
                rows.append((name, f"{info.get('items', 0):,} items · {info.get('source', '')} · sha256 {str(info.get('sha256', ''))[:12]}"))
            else:
                rows.append((name, f"{info.get('status', '?')} ({info.get('reason', '')})"))
        yield [_rule("sets.json"), *_pairs(rows)]
    model = _json(store, m, "model.json") if "model.json" in m.files else None
    if isinstance(model, dict):
        shape = model.get("model", model)
        if isinstance(shape, dict):
            yield [_rule("model.json"), "  " + "  ".join(f"{k}={v}" for k, v in shape.items())
                   + (f"  (step {model['step']})" if "step" in model else "")]
    curve = _json(store, m, "curve.json") if "curve.json" in m.files else None
    val = curve.get("val") if isinstance(curve, dict) else None
    if isinstance(val, list) and val and all(isinstance(p, dict) and "step" in p for p in val):
        metric = next((k for k in val[0] if k != "step"), None)
        if metric:
            points = val if len(val) <= 12 else [val[int(i * (len(val) - 1) / 11)] for i in range(12)]
            yield [_rule(f"curve.json: {metric} by step"),
                   *textwrap.wrap("  ·  ".join(f"{p['step']}: {value(p.get(metric))}" for p in points), WIDTH,
                                  initial_indent="  ", subsequent_indent="  ")]
    samples = _json(store, m, "samples.json") if "samples.json" in m.files else None
    if isinstance(samples, list) and samples:
        # [{"prompt", "completion"}], or per training step [{"step", "samples": [...]}] (the last step shown)
        step = None
        if all(isinstance(s, dict) and isinstance(s.get("samples"), list) for s in samples):
            step, samples = samples[-1].get("step"), samples[-1]["samples"]
        lines = [_rule("samples.json" + (f" at step {step}" if step is not None else ""))]
        for s in samples[:LIST_MAX]:
            if isinstance(s, dict) and "prompt" in s:
                lines.append(f"  {json.dumps(s['prompt'], ensure_ascii=False)} → {json.dumps(s.get('completion', ''), ensure_ascii=False)}")
            else:
                lines.append(f"  {json.dumps(s, ensure_ascii=False)[:WIDTH]}")
        if len(samples) > LIST_MAX:
            lines.append(f"  … (+{len(samples) - LIST_MAX} more)")
        yield lines


# ---------------------------------------------------------------- one run

@dataclass
class StageRun:
    """A stage as the ledger recorded it in one run (several rows when a retried run ran it again)."""

    stage: str
    key: str
    result: str  # computed | cached | failed | interrupted (killed: its heartbeat stopped) | running — of the last attempt
    wall_seconds: float
    cost_usd: float
    device_hours: float
    device: str
    metrics: dict
    attempts: int = 1
    kind: str = ""
    parents: dict = field(default_factory=dict)


def stage_runs(store: Store, run_id: str, con=None) -> list[StageRun]:
    """The run's stages in the order they started, from the ledger (DuckDB `stage_runs`; `con`: a catalog
    connection to reuse). Time and dollars are those of every attempt, an interrupted one's up to its last heartbeat."""
    from .catalog import connect

    rows = (con or connect(store)).execute(
        """SELECT stage, key, cache_hit, status, wall_seconds, cost_usd, device_hours, device_type, devices, nodes, metrics
           FROM stage_runs WHERE run_id = ? ORDER BY "start", "end" """, [run_id]).fetchall()
    out: dict[str, StageRun] = {}
    for stage, key, hit, status, wall, cost, dev_h, dev_type, devices, nodes, metrics in rows:
        result = status if status in UNFINISHED else "cached" if hit else "computed"
        n = (devices or 1) * (nodes or 1)
        device = dev_type if n == 1 else f"{n}×{dev_type}"
        prev = out.get(stage)
        out[stage] = StageRun(stage, key, result, (wall or 0.0) + (prev.wall_seconds if prev else 0.0),
                              (cost or 0.0) + (prev.cost_usd if prev else 0.0), (dev_h or 0.0) + (prev.device_hours if prev else 0.0),
                              device, json.loads(metrics) if isinstance(metrics, str) else (metrics or {}),
                              attempts=(prev.attempts + 1) if prev else 1)
    for s in out.values():
        m = _manifest(store, s.key)
        if m is not None:
            s.kind, s.parents = m.kind, m.parents
    return list(out.values())


def _preset(store: Store, run_id: str) -> str:
    try:
        return str(store.read_json(store._p("runs", f"{run_id}.json")).get("preset") or "")
    except (FileNotFoundError, ValueError):
        return ""


def run_summary(store: Store, run_id: str, *, hints: dict[str, str] | None = None, store_arg: str | None = None,
                until: str | None = None, not_run: Iterable[str] = (), elapsed: float | None = None) -> str:
    """What `chatforge run` ends with: per stage (cached or computed, time, $), the scores under their real
    names, totals, where the artifacts are and the commands to run next.

    `store_arg`: the `--store` the user gave (repeated in the suggested commands); `until`/`not_run`: the
    `--until` stage and the stages it left out; `elapsed`: the run's end-to-end seconds, Prefect included."""
    from .catalog import open_catalog

    catalog = open_catalog(store)  # the cached file: its refresh reads only what changed since it was last used
    try:
        runs = stage_runs(store, run_id, catalog.con)
        # the totals are the run's triple as the catalog defines it (`runs`), the same figures the dashboard shows
        triple = catalog.con.execute("SELECT stage_seconds, cost_usd, device_hours, saved_usd FROM runs WHERE run_id = ?",
                                     [run_id]).fetchone()
    finally:
        catalog.close()
    stage_seconds, cost, device_hours, saved = triple or (0.0, 0.0, 0.0, 0.0)
    refs = store.refs()
    opt = f" --store {shlex.quote(store_arg)}" if store_arg else ""

    def name(s: StageRun) -> str:  # a ref the user can type, when it still points at this run's artifact
        return f"{s.stage}/latest" if refs.get(f"{s.stage}/latest") == s.key else s.key[:12]

    counts = {r: sum(s.result == r for s in runs) for r in ("computed", "cached", *UNFINISHED)}
    tally = ", ".join(f"{n} {r}" for r, n in counts.items() if n)
    title = f"chatforge run {run_id}" + (f" ({preset})" if (preset := _preset(store, run_id)) else "") + f" · {len(runs)} stages: {tally}"
    out = [_rule(title + (f" · {seconds(elapsed)} end to end" if elapsed is not None else ""))]
    w = max([len(s.stage) for s in runs] + [5])
    rw = max([len(s.result) for s in runs] + [9])  # wider only for an `interrupted` row
    out.append(f"  {'stage':<{w}}  {'result':<{rw}} {'wall':>9} {'cost':>9}  {'device':<8} key")
    for s in runs:
        tries = f"  ({s.attempts} tries; time and $ of all)" if s.attempts > 1 else ""
        out.append(f"  {s.stage:<{w}}  {s.result:<{rw}} {seconds(s.wall_seconds):>9} {dollars(s.cost_usd):>9}  {s.device:<8} {s.key[:12]}{tries}")
    out.append(f"  {'total':<{w}}  {'':<{rw}} {seconds(stage_seconds or 0.0):>9} {dollars(cost):>9}  "
               f"{device_hours or 0.0:.3g} device-hours" + (f" · cache hits saved {dollars(saved)}" if saved else ""))

    scored = [s for s in runs if s.result not in UNFINISHED and headline(s.metrics)]
    if scored:
        out += ["", "scores"]
        explained: dict[tuple[str, ...], str] = {}  # several evals of one evalset share one explanation
        for s in scored:
            out.append(f"  {s.stage:<{w}}  " + " · ".join(headline(s.metrics)))
            m = Manifest(key=s.key, kind=s.kind, stage=s.stage, config={}, parents=s.parents, code={}, metrics=s.metrics)
            why = tuple(missing_data(store, m, hints))
            if why and why in explained:
                missing = f"{why[0]} · " if why[0][0].isdigit() else ""  # "N not run (data unavailable): …"
                out += _wrap([f"{missing}why and how: as for {explained[why]}"], " " * (w + 4))
            else:
                explained.setdefault(why, s.stage)
                out += _wrap(list(why), " " * (w + 4))

    out += ["", f"artifacts  {store.url}"]
    nxt: list[tuple[str, str]] = []
    done = [s for s in runs if s.result not in UNFINISHED]
    checkpoint = next((s for s in reversed(done) if s.kind == "checkpoint"), None)
    if checkpoint:
        nxt += [(f"chatforge chat --model {name(checkpoint)}{opt}", f"talk to the {checkpoint.stage} checkpoint"),
                (f"chatforge serve --model {name(checkpoint)}{opt}", "web chat and OpenAI API on http://127.0.0.1:8000")]
    for s in done:
        if s.kind == "eval":
            nxt.append((f"chatforge artifacts show {name(s)}{opt}", f"{s.stage}: scores per task, samples"))
    # a report artifact other than this run's card (which `chatforge report` prints, with this run's ledger)
    report = next((s for s in reversed(done) if s.kind == "report" and s.metrics.get("run_id") != run_id), None)
    if report:
        nxt.append((f"chatforge artifacts show {name(report)} --report{opt}", f"the {report.stage} report"))
    if not nxt and done:
        nxt.append((f"chatforge artifacts show {name(done[-1])}{opt}", f"what {done[-1].stage} made"))
    nxt.append((f"chatforge report {run_id}{opt}", "this run's report card (markdown; `> report.md` keeps it)"))
    nxt.append((f"chatforge artifacts query \"select stage, cache_hit, wall_seconds, cost_usd from stage_runs where run_id = '{run_id}'\"{opt}",
                "this run's ledger"))
    out.append("next")
    cw = max((len(c) for c, _ in nxt if len(c) <= 80), default=0)
    out += [f"  {c:<{cw}}  # {why}" for c, why in nxt]
    not_run = list(not_run)
    if until and not_run:
        out.append(f"  (the same command without --until {until} goes on to {', '.join(not_run)}; finished stages come from the store)")
    return "\n".join(out) + "\n"
