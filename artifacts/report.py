"""The report card of one run: nanochat's report.md, for a chatforge run, read from the DuckDB catalog.

    card(con, run_id, max_metrics=20, dag=None) -> dict   every fact of the card, JSON-ready (report.json)
    markdown(card) -> str                                  the card as markdown (report.md, `chatforge report`)

`con` is a connection from `artifacts.catalog` (`connect(store)`, or `open_catalog(store).con`). The card reads
`runs` (the run's cost / time / score triple, defined there once), `stage_runs` (the ledger), `run_info` (the
run's start record and environment), `artifacts` (manifests: kind, code version, host, lineage) and `evals`
(per-task scores). An unknown run id raises `UnknownRun` (a one-line StoreError naming how to list the runs).

As nanochat's card: the environment, one section per stage (time, cost, cache hit, key metrics), then a
summary with the table of metrics by model (BASE / MID / SFT / RL, the columns that exist) and the run's
totals. Unlike nanochat's, it is built from the ledger, not written by the stages as they go, so it exists for
any run at any time: a run that stopped early gets a card of what it did, a killed attempt included (the ledger
reports it `interrupted`, charged up to its last heartbeat). An attempt still running is named, not yet counted:
the card's stages and totals are the attempts that ended or stopped. Nothing is measured here and no stage
is known by name: a model column is the checkpoint stage an eval artifact scored (its lineage). No torch.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from .catalog import json_value
from .errors import StoreError
from .summary import NOT_RUN, UNFINISHED, dollars, flatten, seconds, suite_name, value

QUERY_RUNS = "chatforge artifacts query 'select run_id from runs'"
MODEL_ORDER = ("base", "mid", "sft", "rl")  # nanochat's columns, in training order; any other checkpoint follows
# nanochat's names for the chat tasks in its table; a task not listed keeps its id
TASK_LABELS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "mmlu": "MMLU", "gsm8k": "GSM8K",
               "humaneval": "HumanEval", "spellingbee": "SpellingBee"}
DEVICE_METRICS = {"device", "device_type", "world_size"}  # already in a section's device line
HEADLINE = {"score_name", "score"}  # an eval's headline, shown above its section's metrics
LONG_TEXT = 120  # a string metric longer than this is a description, not a key metric


class UnknownRun(StoreError):
    """No run with this id in the store: no ledger row and no run record."""


# ---------------------------------------------------------------- reading the catalog

def _rows(con, sql: str, params: Sequence = ()) -> list[dict]:
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


_loads = json_value


def _plain(v: Any) -> Any:
    """JSON-ready: timestamps as ISO text in UTC, JSON columns parsed."""
    if isinstance(v, datetime):
        return v.astimezone(timezone.utc).isoformat(timespec="seconds")
    return v


def _score(name: str | None, v: float | None) -> str:
    """A score under its real name (`CORE-18 (partial) 0.2219`), or its suite's `not run: data unavailable`."""
    if not name:
        return ""
    return f"{suite_name(name)} {NOT_RUN}" if v is None else f"{name} {v:.4f}"


def _stages(rows: list[dict]) -> list[dict]:
    """The ledger rows of a run, one entry per stage in the order the stages started: times, dollars and device
    hours of every attempt added up (a retried run ran a stage again; an interrupted attempt up to its last
    heartbeat), the outcome of the last one."""
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["stage"], {"stage": r["stage"], "attempts": 0, "failed_attempts": 0, "interrupted_attempts": 0,
                                        "wall_seconds": 0.0, "cost_usd": 0.0, "saved_usd": 0.0, "device_hours": 0.0,
                                        "start": _plain(r.get("start")), "metrics": {}, "error": ""})
        s["attempts"] += 1
        for k in ("wall_seconds", "cost_usd", "saved_usd", "device_hours"):
            s[k] += r.get(k) or 0.0
        status = r.get("status")
        s["failed_attempts"] += status == "failed"
        s["interrupted_attempts"] += status == "interrupted"
        n = (r.get("devices") or 1) * (r.get("nodes") or 1)
        s.update(key=r["key"], end=_plain(r.get("end")),
                 result=status if status in UNFINISHED else "cached" if r.get("cache_hit") else "computed",
                 device=r.get("device_type") if n == 1 else f"{n}×{r.get('device_type')}",
                 price_per_device_hour=r.get("price_per_device_hour"), price_source=r.get("price_source"))
        if status in UNFINISHED:
            s["error"] = r.get("error") or ""
        else:
            s["metrics"] = _loads(r.get("metrics")) or {}
    return list(out.values())


def key_metrics(metrics: dict, limit: int) -> tuple[dict, int]:
    """The metrics a stage's section lists, at most `limit`, and how many were left out: no device facts (the
    section's device line has them), no headline score (the section's title line has it), no long
    descriptions; the stage's own numbers first, then its other values, its lists, then nested numbers (dotted
    names; nested text is identity, not a result), each group in stored order."""
    def rank(kv: tuple[str, Any]) -> tuple[int, int]:
        name, v = kv
        nested = "." in name or "[" in name
        kind = 0 if isinstance(v, (int, float)) and not isinstance(v, bool) else 2 if isinstance(v, (list, dict)) else 1
        return nested, kind

    def shown(name: str, v: Any) -> bool:
        if name in DEVICE_METRICS or name in HEADLINE or (isinstance(v, str) and len(v) > LONG_TEXT):
            return False
        # nested: figures only (a compression ratio, a count per split), not identities (paths, hashes, kinds)
        return not ("." in name or "[" in name) or (isinstance(v, (int, float)) and not isinstance(v, bool))

    flat = [(k, v) for k, v in flatten(metrics) if shown(k, v)]
    ordered = sorted(flat, key=rank)  # stable: stored order within a group
    return dict(ordered[:limit]), max(0, len(ordered) - limit)


def _suites(rows: list[dict]) -> list[dict]:
    """An eval artifact's `evals` rows as suites: the suite's mean (its row whose task is the suite) and one
    entry per task with its metrics side by side (accuracy, centered; bpb), n and status."""
    suites: dict[str, dict] = {}
    for r in rows:
        s = suites.setdefault(r["suite"], {"suite": r["suite"], "value": None, "status": NOT_RUN, "tasks": {}})
        if r["task"] == r["suite"]:
            s["value"], s["status"] = r["value"], r["status"]
            continue
        t = s["tasks"].setdefault(r["task"], {"task": r["task"], "n": r["n"], "status": r["status"]})
        if r["value"] is not None or r["status"] != "ok":
            t[r["metric"]] = r["value"]
    for s in suites.values():
        s["tasks"] = list(s["tasks"].values())
        if s["suite"] == "bpb":  # bits per byte has no mean row: each split is its own figure
            s["status"] = "ok"
    return list(suites.values())


def _model_column(stage: dict, arts: dict[str, dict]) -> str:
    """Which model an eval scored: the stage of the checkpoint among its parents (its lineage), else the
    `checkpoint` its metrics name, else the eval stage itself."""
    a = arts.get(stage["key"]) or {}
    for parent in (_loads(a.get("parents")) or {}).values():
        p = arts.get(parent)
        if p and p.get("kind") == "checkpoint":
            return p["stage"]
    return str(stage["metrics"].get("checkpoint") or stage["stage"])


def _table(evals: list[tuple[str, dict]]) -> dict:
    """The metrics-by-model table: rows CORE, bits per byte, each chat task's accuracy, ChatCORE (nanochat's
    order); a column per model that has scores. A value is a number, or the status of a score that did not run."""
    cells: dict[str, dict[str, Any]] = {}
    rank: dict[str, int] = {}
    for column, st in evals:
        for s in st["suites"]:
            suite = suite_name(s["suite"])
            if s["suite"] == "bpb":
                for t in s["tasks"]:
                    rank.setdefault(f"{t['task']} bpb", 1)
                    cells.setdefault(f"{t['task']} bpb", {})[column] = t.get("bpb", t["status"])
                continue
            if suite == "ChatCORE":
                for t in s["tasks"]:
                    label = TASK_LABELS.get(t["task"], t["task"])
                    rank.setdefault(label, 2)
                    cells.setdefault(label, {})[column] = t.get("accuracy") if t["status"] == "ok" else t["status"]
            rank.setdefault(s["suite"], 0 if suite == "CORE" else 3 if suite == "ChatCORE" else 2)
            cells.setdefault(s["suite"], {})[column] = s["value"] if s["value"] is not None else s["status"]
        if not st["suites"] and st["metrics"].get("score_name"):  # scores whose evals.json is gone: the ledger's headline
            name = st["metrics"]["score_name"]
            rank.setdefault(name, 0 if suite_name(name) == "CORE" else 3)
            cells.setdefault(name, {})[column] = st["metrics"].get("score") if st["metrics"].get("score") is not None else NOT_RUN
    columns = sorted({c for c, _ in evals}, key=lambda c: (MODEL_ORDER.index(c) if c in MODEL_ORDER else len(MODEL_ORDER), c))
    order = sorted(cells, key=lambda label: rank[label])  # stable: first appearance within a rank
    return {"columns": [c.upper() for c in columns],
            "rows": [{"metric": label, **{c.upper(): cells[label][c] for c in columns if c in cells[label]}} for label in order]}


def card(con, run_id: str, max_metrics: int = 20, dag: Sequence[str] | None = None) -> dict:
    """Every fact of `run_id`'s report card, JSON-ready (what report.json holds and `markdown` renders).

    `max_metrics`: metrics listed per stage section; `dag`: the flow's stage names in order, when known (the
    CLI and the report stage pass them): the stages the run did not reach are then listed as not run, and a
    stage outside it is not named as running (the report stage leaves itself out: its own attempt is running
    while it writes the card). Attempts still running are listed in `running`, not in the stages or totals.
    Raises UnknownRun when the store has neither a ledger row nor a run record of `run_id`."""
    run = next(iter(_rows(con, "SELECT * FROM runs WHERE run_id = ?", [run_id])), None)
    info = next(iter(_rows(con, "SELECT * FROM run_info WHERE run_id = ?", [run_id])), None)
    if run is None and info is None:
        raise UnknownRun(f"no run {run_id!r} in this store: list the runs with `{QUERY_RUNS}`")
    run, info = {k: _plain(v) for k, v in (run or {}).items()}, {k: _plain(v) for k, v in (info or {}).items()}
    rows = _rows(con, 'SELECT * FROM stage_runs WHERE run_id = ? ORDER BY "start", "end"', [run_id])
    # the card is of attempts that ended or stopped, as the run's totals (`runs`) are
    stages = _stages([r for r in rows if r["status"] != "running"])
    running = list(dict.fromkeys(r["stage"] for r in rows if r["status"] == "running" and (dag is None or r["stage"] in dag)))
    keys = [s["key"] for s in stages]
    arts = {a["key"]: a for a in _rows(con, "SELECT key, kind, stage, host, code, parents FROM artifacts WHERE list_contains(?, key)", [keys])}
    parents = [p for a in arts.values() for p in (_loads(a["parents"]) or {}).values() if p not in arts]
    arts |= {a["key"]: a for a in _rows(con, "SELECT key, kind, stage, host, code, parents FROM artifacts WHERE list_contains(?, key)", [parents])}
    evals_by_key: dict[str, list[dict]] = {}
    for r in _rows(con, "SELECT key, suite, task, metric, value, n, status FROM evals WHERE list_contains(?, key)", [keys]):
        evals_by_key.setdefault(r["key"], []).append(r)

    scored: list[tuple[str, dict]] = []
    for s in stages:
        # what the artifact under the key is: not for a failed or interrupted stage, whose key may hold another
        # run's artifact
        a = (arts.get(s["key"]) or {}) if s["result"] not in UNFINISHED else {}
        s["kind"] = a.get("kind") or ""
        s["code_version"] = (_loads(a.get("code")) or {}).get("version", "")
        s["host"] = a.get("host") or ""
        s["key_metrics"], s["metrics_left_out"] = key_metrics(s["metrics"], max_metrics)
        s["headline"] = _score(s["metrics"].get("score_name"), s["metrics"].get("score"))
        s["suites"] = _suites(evals_by_key.get(s["key"], [])) if s["result"] not in UNFINISHED else []
        if s["result"] not in UNFINISHED and (s["kind"] == "eval" or s["suites"]):
            s["model"] = _model_column(s, arts)
            scored.append((s["model"], s))

    env = _loads(info.get("env")) or {}
    versions: dict[str, list[str]] = {}
    hosts: dict[str, list[str]] = {}
    for s in stages:
        if s["code_version"]:
            versions.setdefault(s["code_version"], []).append(s["stage"])
        if s["host"]:
            hosts.setdefault(s["host"], []).append(s["stage"])
    ran = [s["stage"] for s in stages] + running
    return {
        "run_id": run_id,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": run.get("preset") or info.get("preset") or "",
        "flow_run_name": info.get("flow_run_name") or "",
        "started": run.get("started") or info.get("started"),
        "finished": run.get("finished"),
        "environment": {
            "host": run.get("host") or info.get("host") or "",
            "hardware": run.get("hardware") or "",
            "code": env.get("code") or "",
            "artifact_code": versions, "artifact_hosts": hosts,
            **{k: env[k] for k in ("python", "platform", "cpus", "memory_gb", "gpus", "packages") if k in env},
        },
        "stages": stages,
        "running": running,
        "not_run": [name for name in dag or () if name not in ran],
        "models": _table(scored),
        "totals": {
            "wall_clock_seconds": run.get("wall_clock_seconds"), "stage_seconds": run.get("stage_seconds"),
            "cost_usd": run.get("cost_usd"), "saved_usd": run.get("saved_usd"),
            "device_hours": sum(s["device_hours"] for s in stages),
            "stage_executions": run.get("stage_executions") or 0, "cache_hits": run.get("cache_hits") or 0,
            "failures": run.get("failures") or 0, "interrupted": run.get("interrupted") or 0,
        },
        "scores": {k: run.get(k) for k in ("core_name", "core", "chat_stage", "chat_name", "chat_score", "score_name", "score")},
    }


# ---------------------------------------------------------------- markdown

def _cell(v: Any) -> str:
    """A table cell: a score with 4 decimals, a status as itself; never a pipe or a line break."""
    text = f"{v:.4f}" if isinstance(v, float) else "—" if v is None else value(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _hours(h: float) -> str:
    return "0" if not h else "< 0.001" if h < 0.001 else f"{h:.3g}"


def _when(iso: str | None) -> str:
    return iso[:19].replace("T", " ") + " UTC" if iso else "—"


def _headline(c: dict) -> str:
    t, sc = c["totals"], c["scores"]
    parts = [c["preset"] or "custom", c["environment"]["hardware"] or "no device recorded",
             dollars(t["cost_usd"]) + (f" (cache hits saved {dollars(t['saved_usd'])})" if t["saved_usd"] else ""),
             f"{seconds(t['wall_clock_seconds'])} wall clock"]
    score = _score(sc.get("score_name"), sc.get("score"))
    return " · ".join(parts + ([score] if score else ["no score yet"]))


def _environment(c: dict) -> list[str]:
    e = c["environment"]
    out = ["## Environment", ""]
    run = [f"preset {c['preset'] or 'custom'}"] + ([f"flow run {c['flow_run_name']}"] if c["flow_run_name"] else [])
    out.append(f"- Run: {' · '.join(run)} · started {_when(c['started'])} · finished {_when(c['finished'])}")
    out.append(f"- Host: {e['host'] or 'not recorded'}" + (
        "" if set(e["artifact_hosts"]) <= {e["host"]} else
        " · artifacts made on " + "; ".join(f"{h} ({', '.join(st)})" for h, st in e["artifact_hosts"].items())))
    out.append(f"- Hardware: {e['hardware'] or 'no stage computed'} (the devices of the stages this run computed)")
    one = len(e["artifact_code"]) == 1  # one version made them all: say how many, not which
    code = [f"{v} ({('1 artifact' if len(st) == 1 else f'all {len(st)} artifacts') if one else ', '.join(st)})"
            for v, st in e["artifact_code"].items()]
    code = ([f"{e['code']} (the flow)"] if e["code"] else []) + ([f"artifacts: {'; '.join(code)}"] if code else [])
    out.append(f"- Code: {' · '.join(code) or 'not recorded'}")
    if "python" in e:
        machine = [f"Python {e['python']}", e.get("platform", "")]
        if e.get("cpus"):
            machine.append(f"{e['cpus']} CPUs")
        if e.get("memory_gb"):
            machine.append(f"{e['memory_gb']:.1f} GB memory")
        gpus: dict[str, int] = {}
        for g in e.get("gpus") or []:
            gpus[g] = gpus.get(g, 0) + 1
        machine.append("GPUs: " + ", ".join(f"{n}× {g}" for g, n in gpus.items()) if gpus else "no GPU on the flow's host")
        out.append("- Machine: " + " · ".join(m for m in machine if m))
        packages = e.get("packages") or {}
        out.append("- Packages: " + (", ".join(f"{k} {v}" for k, v in packages.items()) or "none recorded"))
    else:
        out.append("- Machine and packages: not recorded (a run started before chatforge recorded them)")
    return out + [""]


def _stage(s: dict) -> list[str]:
    result = s["result"]
    if result == "cached":
        result += f" (saved {dollars(s['saved_usd'])})" if s["saved_usd"] else ""
    if s["attempts"] > 1:
        stopped = [f"{s[f'{what}_attempts']} {what}" for what in ("failed", "interrupted") if s.get(f"{what}_attempts")]
        result += f", {s['attempts']} attempts ({', '.join(stopped or ['0 failed'])}; time and $ of all)"
    out = [f"### {s['stage']} · {result} · {seconds(s['wall_seconds'])} · {dollars(s['cost_usd'])}", ""]
    price = f"{dollars(s['price_per_device_hour'])}/device-hour" + (f" ({s['price_source']})" if s.get("price_source") else "")
    line = [s["device"] or "", price, f"{_hours(s['device_hours'])} device-hours", f"key {s['key'][:12]}"]
    if s.get("kind"):
        line.insert(0, s["kind"])
    if s.get("code_version"):
        line.append(f"code {s['code_version']}")
    out += [" · ".join(x for x in line if x), ""]
    if s["result"] == "failed":
        out += [f"Failed: `{s['error'].splitlines()[0] if s['error'] else 'no error recorded'}`", ""]
    if s["result"] == "interrupted":
        out += [f"Interrupted: its heartbeat stopped at {_when(s.get('end'))} (the process was killed, or its machine "
                "lost); time and $ are counted up to then.", ""]
    if s["headline"] and not any(suite["suite"] != "bpb" for suite in s["suites"]):  # its evals.json is gone: the ledger's
        out += [f"**{s['headline']}**", ""]
    for suite in s["suites"]:
        if suite["suite"] != "bpb":
            out.append(f"**{_score(suite['suite'], suite['value'])}**" + (f" ({suite['status']})" if suite["status"] not in ("ok", NOT_RUN) else ""))
            out.append("")
        metrics = [m for m in ("accuracy", "centered", "bpb") if any(m in t for t in suite["tasks"])]
        if suite["tasks"]:
            out += [f"| {'task' if suite['suite'] != 'bpb' else 'bits per byte'} | {' | '.join(metrics)} | n |",
                    "|---" + "|---:" * (len(metrics) + 1) + "|"]
            for t in suite["tasks"]:
                if t["status"] != "ok":
                    out.append(f"| {t['task']} | {t['status']}" + " |" * len(metrics) + " |")
                else:
                    out.append(f"| {t['task']} | " + " | ".join(_cell(t.get(m)) for m in metrics) + f" | {_cell(t['n'])} |")
            out.append("")
    shown = s["key_metrics"]
    out += [f"- {k}: {value(v)}" for k, v in shown.items()]
    if s["metrics_left_out"]:
        out.append(f"- … {s['metrics_left_out']} more: `chatforge artifacts show {s['key'][:12]}`")
    return out + ([""] if shown or s["metrics_left_out"] else [])


def _summary(c: dict) -> list[str]:
    t, sc, m = c["totals"], c["scores"], c["models"]
    out = ["## Summary", ""]
    if m["rows"]:
        out += ["| metric | " + " | ".join(m["columns"]) + " |", "|---" + "|---:" * len(m["columns"]) + "|"]
        out += [f"| {_cell(r['metric'])} | " + " | ".join("not run" if r.get(col) == NOT_RUN else _cell(r.get(col))
                                                            for col in m["columns"]) + " |" for r in m["rows"]]
        if any(NOT_RUN in r.values() for r in m["rows"]):
            out += ["", f"not run: {NOT_RUN.split(': ', 1)[1]} (its eval set has no items; the stage's section names them)"]
        out.append("")
    else:
        out += ["No model was scored in this run.", ""]
    core = _score(sc.get("core_name"), sc.get("core"))
    chat = _score(sc.get("chat_name"), sc.get("chat_score"))
    if core:
        out.append(f"- Base model: {core}")
    if chat:
        out.append(f"- Final chat model ({sc.get('chat_stage')}): {chat}")
    n, hits, failures, interrupted = t["stage_executions"], t["cache_hits"], t["failures"], t.get("interrupted") or 0
    out += [
        f"- Total wall clock time: {seconds(t['wall_clock_seconds'])} (first stage start to last stage end)",
        f"- Stage time: {seconds(t['stage_seconds'])} (the sum over {n} stage executions: "
        f"{n - hits - failures - interrupted} computed, {hits} cached, {failures} failed"
        + (f", {interrupted} interrupted" if interrupted else "") + ")",
        f"- Cost: {dollars(t['cost_usd'])} ({_hours(t['device_hours'])} device-hours; computed, failed and interrupted "
        "stages at the price each ledger row recorded, an interrupted one up to its last heartbeat; a cache hit costs $0)",
        f"- Saved by cache hits: {dollars(t['saved_usd'])} (what those artifacts cost the run that computed them)",
    ]
    return out


def markdown(c: dict) -> str:
    """The card `card` returned, as markdown: title and headline triple, Environment, Stages, Summary."""
    out = [f"# chatforge report card: run {c['run_id']}", "", _headline(c), "",
           f"Generated {_when(c['generated'])} from the ledger and the artifacts' manifests.", ""]
    out += _environment(c)
    out += ["## Stages", ""]
    running = c.get("running") or []
    if not c["stages"]:
        out += ["No stage of this run has ended yet." if running else "No stage of this run is in the ledger yet.", ""]
    for s in c["stages"]:
        out += _stage(s)
    if running:
        one = len(running) == 1
        out += [f"Running: {', '.join(running)} (not in this card until {'it ends' if one else 'they end'}, or "
                f"{'its heartbeat stops' if one else 'their heartbeats stop'}: then {'it shows' if one else 'they show'} "
                "as interrupted).", ""]
    stopped = [f"{s['stage']} {s['result']}" for s in c["stages"] if s["result"] in ("failed", "interrupted")]
    if stopped or c["not_run"]:
        why = f"the run stopped: {', '.join(stopped)}" if stopped else "the run did not reach them: an --until run, or one that stopped"
        if running and not stopped:
            why = "the run has not reached them yet, or stopped"
        out += [f"Not run: {', '.join(c['not_run'])} ({why}).", ""] if c["not_run"] else [f"Stopped: {', '.join(stopped)}.", ""]
    out += _summary(c)
    return "\n".join(out).rstrip() + "\n"
