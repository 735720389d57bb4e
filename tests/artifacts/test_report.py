"""The report card (artifacts/report.py) and `chatforge report` on a hand-built store: ledger rows, run records,
manifests and evals.json written as the flow writes them, then read back through the DuckDB catalog."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from artifacts import ledger, report
from artifacts.catalog import connect
from artifacts.manifest import Manifest
from artifacts.store import Store

ROOT = Path(__file__).resolve().parents[2]
FULL = "11111111-0000-4000-8000-000000000001"  # data cached (computed by EARLIER), base on 8×H100, evals of base/mid/sft
EARLIER = "11111111-0000-4000-8000-000000000000"  # computed the data artifact, at a price
STOPPED = "11111111-0000-4000-8000-000000000002"  # data cached, tokenizer computed, base failed: stopped early
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
ENV = {"code": "0.1.0+abc1234", "python": "3.11.7", "platform": "Linux-6.1-x86_64", "cpus": 16, "memory_gb": 251.4,
       "gpus": ["NVIDIA H100 80GB HBM3 (81559 MiB)"] * 8, "packages": {"torch": "2.13.0", "prefect": "3.9.1"}}
DAG = ["data", "tokenizer", "base", "base_eval", "chat_eval_base", "mid", "chat_eval_mid", "sft", "chat_eval_sft",
       "rl", "chat_eval_rl", "report"]


def key(stage: str) -> str:
    return (stage.encode().hex() * 64)[:64]


def commit(store: Store, stage: str, kind: str, metrics: dict, parents=(), evals: list | None = None) -> None:
    with store.staging(key(stage)) as tmp:
        (tmp / "out.txt").write_text(stage)
        if evals is not None:
            (tmp / "evals.json").write_text(json.dumps(evals))
        store.commit(tmp, Manifest(key=key(stage), kind=kind, stage=stage, config={}, parents={p: key(p) for p in parents},
                                   code={"fingerprint": "f" * 64, "version": "0.1.0+abc1234"}, metrics=metrics, wall_seconds=1.0))


def row(run: str, stage: str, t: float, seconds: float, *, hit=False, status="completed", metrics=None, device="cpu",
        devices=1, price=0.0, source="built-in", error="") -> ledger.LedgerRow:
    start = T0 + timedelta(seconds=t)
    return ledger.LedgerRow(run_id=run, stage=stage, key=key(stage), cache_hit=hit, start=start.isoformat(),
                            end=(start + timedelta(seconds=seconds)).isoformat(), wall_seconds=seconds, device_type=device,
                            devices=devices, nodes=1, price_per_device_hour=price, price_source=source, status=status,
                            preset="d20", error=error, metrics=metrics or {})


def chat_rows(ok: dict[str, tuple[float, float]], missing: list[str], mean: float) -> list[dict]:
    """evals.json of a chat eval: accuracy and centered per task, the not-run tasks, the ChatCORE mean."""
    suite = f"ChatCORE-{len(ok)} (partial)"
    rows = [{"suite": suite, "task": t, "metric": m, "value": v, "n": 100, "status": "ok"}
            for t, (acc, cen) in ok.items() for m, v in (("accuracy", acc), ("centered", cen))]
    rows += [{"suite": suite, "task": t, "metric": "centered", "value": None, "n": None, "status": "not run: data unavailable"}
             for t in missing]
    return rows + [{"suite": suite, "task": suite, "metric": "mean_centered", "value": mean, "n": len(ok), "status": "ok"}]


BASE = {"val_bpb": 0.8123, "steps": 21400, "tokens_per_s": 1.1e6, "mfu": 0.48, "params": 560_988_160,
        "resumed_from": [], "device_type": "H100", "world_size": 8,
        "split": "a long description of how the split was made, " * 5}
BASE_EVAL = {"score": 0.2219, "score_name": "CORE-2 (partial)", "core_tasks": 2, "core_missing": ["squad"],
             "val_bpb": 0.81, "train_bpb": 0.8}
CORE_ROWS = [
    {"suite": "CORE-2 (partial)", "task": "copa", "metric": "accuracy", "value": 0.7, "n": 100, "status": "ok"},
    {"suite": "CORE-2 (partial)", "task": "copa", "metric": "centered", "value": 0.4, "n": 100, "status": "ok"},
    {"suite": "CORE-2 (partial)", "task": "piqa", "metric": "accuracy", "value": 0.52, "n": 100, "status": "ok"},
    {"suite": "CORE-2 (partial)", "task": "piqa", "metric": "centered", "value": 0.0438, "n": 100, "status": "ok"},
    {"suite": "CORE-2 (partial)", "task": "squad", "metric": "centered", "value": None, "n": None, "status": "not run: data unavailable"},
    {"suite": "CORE-2 (partial)", "task": "CORE-2 (partial)", "metric": "mean_centered", "value": 0.2219, "n": 2, "status": "ok"},
    {"suite": "bpb", "task": "train", "metric": "bpb", "value": 0.8, "n": 10000, "status": "ok"},
    {"suite": "bpb", "task": "val", "metric": "bpb", "value": 0.81, "n": 10000, "status": "ok"},
]


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(str(tmp_path / "store"))
    commit(s, "data", "dataset", {"docs": {"train": 9794, "val": 530}})
    commit(s, "tokenizer", "tokenizer", {"vocab_size": 65536, "train_seconds": 60.2}, parents=("data",))
    commit(s, "chat_evalset", "evalset", {"items": 3})
    commit(s, "base", "checkpoint", BASE, parents=("data", "tokenizer"))
    commit(s, "base_eval", "eval", BASE_EVAL, parents=("data", "base"), evals=CORE_ROWS)
    evals = {"base": chat_rows({"arc_easy": (0.26, 0.0133), "gsm8k": (0.0, 0.0)}, ["humaneval"], 0.0067),
             "mid": chat_rows({"arc_easy": (0.39, 0.1867), "gsm8k": (0.02, 0.02)}, ["humaneval"], 0.1033),
             "sft": chat_rows({"arc_easy": (0.41, 0.2133), "gsm8k": (0.05, 0.05)}, ["humaneval"], 0.1317)}
    for ckpt, rows in evals.items():
        if ckpt != "base":
            commit(s, ckpt, "checkpoint", {"val_loss": 1.2}, parents=("base",) if ckpt == "mid" else ("mid",))
        mean = rows[-1]["value"]
        commit(s, f"chat_eval_{ckpt}", "eval", {"score": mean, "score_name": "ChatCORE-2 (partial)", "checkpoint": ckpt},
               parents=(ckpt, "chat_evalset"), evals=rows)
    ledger.record_run(s, FULL, {"preset": "d20", "started": T0.isoformat(), "host": "node-1", "config": {},
                                "flow_run_name": "gifted-otter", "env": ENV})
    ledger.append(s, row(EARLIER, "data", -7200, 1800, device="H100", devices=8, price=3.0))  # $12 to make
    ledger.append(s, row(FULL, "data", 0, 0.5, hit=True, metrics={"docs": {"train": 9794, "val": 530}}))
    ledger.append(s, row(FULL, "tokenizer", 1, 60, metrics={"vocab_size": 65536, "train_seconds": 60.2}))
    ledger.append(s, row(FULL, "base", 61, 3 * 3600, device="H100", devices=8, price=2.49,
                         source="--set cost.prices.H100", metrics=BASE))  # 24 device-hours: $59.76
    t = 61 + 3 * 3600
    for stage, seconds, metrics in (("base_eval", 360, BASE_EVAL), ("chat_eval_base", 120, None), ("mid", 1800, {"val_loss": 1.2}),
                                    ("chat_eval_mid", 120, None), ("sft", 600, {"val_loss": 1.1}), ("chat_eval_sft", 120, None)):
        if metrics is None:
            ckpt = stage.removeprefix("chat_eval_")
            metrics = {"score": evals[ckpt][-1]["value"], "score_name": "ChatCORE-2 (partial)", "checkpoint": ckpt}
        ledger.append(s, row(FULL, stage, t, seconds, device="H100", devices=8, price=2.49, source="--set cost.prices.H100",
                             metrics=metrics))
        t += seconds
    ledger.record_run(s, STOPPED, {"preset": "d20", "started": (T0 + timedelta(days=1)).isoformat(), "host": "node-2", "config": {}})
    day = 86400
    ledger.append(s, row(STOPPED, "data", day, 0.4, hit=True, metrics={"docs": {"train": 9794, "val": 530}}))
    ledger.append(s, row(STOPPED, "tokenizer", day + 1, 0.3, hit=True, metrics={"vocab_size": 65536}))
    ledger.append(s, row(STOPPED, "base", day + 2, 600, device="H100", devices=8, price=3.0, status="failed",
                         error="OutOfMemoryError: CUDA out of memory | tried to allocate 2 GiB\nmore lines"))
    return s


def test_card_has_a_section_per_stage_with_time_cost_cache_hit_and_key_metrics(store):
    c = report.card(connect(store), FULL, max_metrics=5, dag=DAG)
    by = {s["stage"]: s for s in c["stages"]}
    assert list(by) == ["data", "tokenizer", "base", "base_eval", "chat_eval_base", "mid", "chat_eval_mid", "sft", "chat_eval_sft"]
    assert by["data"]["result"] == "cached" and by["data"]["cost_usd"] == 0 and by["data"]["saved_usd"] == pytest.approx(12.0)
    base = by["base"]
    assert base["result"] == "computed" and base["device"] == "8×H100" and base["wall_seconds"] == 3 * 3600
    assert base["cost_usd"] == pytest.approx(59.76) and base["price_source"] == "--set cost.prices.H100"
    assert base["kind"] == "checkpoint" and base["code_version"] == "0.1.0+abc1234"
    # its own numbers before its lists, no device facts, no long descriptions, at most 5, and how many were left out
    assert sorted(base["key_metrics"]) == ["mfu", "params", "steps", "tokens_per_s", "val_bpb"]
    assert base["metrics_left_out"] == 1  # resumed_from
    assert [s["suite"] for s in by["base_eval"]["suites"]] == ["CORE-2 (partial)", "bpb"]
    copa = by["base_eval"]["suites"][0]["tasks"][0]
    assert copa == {"task": "copa", "n": 100, "status": "ok", "accuracy": 0.7, "centered": 0.4}
    assert c["not_run"] == ["rl", "chat_eval_rl", "report"]

    md = report.markdown(c)
    assert md.startswith(f"# chatforge report card: run {FULL}\n")
    assert "### data · cached (saved $12.00) · 0.5 s · $0.00" in md
    assert "### base · computed · 3 h 00 m · $59.76" in md
    assert "checkpoint · 8×H100 · $2.49/device-hour (--set cost.prices.H100) · 24 device-hours · key " + key("base")[:12] in md
    assert "- val_bpb: 0.8123" in md and "- steps: 21,400" in md and "- … 1 more: `chatforge artifacts show" in md
    assert "device_type" not in md and "a long description" not in md
    assert "**CORE-2 (partial) 0.2219**" in md and "| copa | 0.7000 | 0.4000 | 100 |" in md
    assert "| squad | not run: data unavailable | | |" in md
    assert "Not run: rl, chat_eval_rl, report" in md


def test_metrics_by_model_table_has_only_the_models_that_were_scored(store):
    c = report.card(connect(store), FULL)
    table = c["models"]
    assert table["columns"] == ["BASE", "MID", "SFT"]  # no RL column: this run has no rl eval
    rows = {r["metric"]: r for r in table["rows"]}
    assert [r["metric"] for r in table["rows"]] == ["CORE-2 (partial)", "train bpb", "val bpb", "ARC-Easy", "GSM8K",
                                                    "HumanEval", "ChatCORE-2 (partial)"]
    assert rows["CORE-2 (partial)"] == {"metric": "CORE-2 (partial)", "BASE": 0.2219}
    assert rows["ARC-Easy"] == {"metric": "ARC-Easy", "BASE": 0.26, "MID": 0.39, "SFT": 0.41}
    assert rows["HumanEval"]["SFT"] == "not run: data unavailable"
    assert rows["ChatCORE-2 (partial)"]["SFT"] == pytest.approx(0.1317)
    md = report.markdown(c)
    assert "| metric | BASE | MID | SFT |\n|---|---:|---:|---:|\n" in md
    assert "| ARC-Easy | 0.2600 | 0.3900 | 0.4100 |" in md
    assert "| CORE-2 (partial) | 0.2219 | — | — |" in md
    assert "| HumanEval | not run | not run | not run |" in md and "not run: data unavailable (its eval set" in md


def test_totals_environment_and_scores_come_from_the_runs_triple(store):
    c = report.card(connect(store), FULL)
    t = c["totals"]
    # stage time: 0.5 + 60 + 10800 + 360 + 120 + 1800 + 120 + 600 + 120; wall clock: first start to last end
    assert t["stage_seconds"] == pytest.approx(13980.5)
    assert t["wall_clock_seconds"] == pytest.approx(61 + 3 * 3600 + 360 + 120 + 1800 + 120 + 600 + 120)
    # H100 rows: (10800 + 360 + 120 + 1800 + 120 + 600 + 120) s × 8 devices × $2.49/h; the cached data row saved $12
    assert t["cost_usd"] == pytest.approx((13920 / 3600) * 8 * 2.49)
    assert t["saved_usd"] == pytest.approx(12.0)
    assert (t["stage_executions"], t["cache_hits"], t["failures"]) == (9, 1, 0)
    assert c["scores"]["core_name"] == "CORE-2 (partial)" and c["scores"]["chat_stage"] == "chat_eval_sft"
    assert c["environment"]["hardware"] == "8×H100 + cpu" and c["environment"]["host"] == "node-1"
    md = report.markdown(c)
    headline = md.splitlines()[2]
    assert headline == ("d20 · 8×H100 + cpu · $77.02 (cache hits saved $12.00) · 3 h 53 m wall clock · "
                        "ChatCORE-2 (partial) 0.1317")
    assert "- Total wall clock time: 3 h 53 m (first stage start to last stage end)" in md
    assert "- Cost: $77.02" in md and "- Saved by cache hits: $12.00" in md
    assert "- Base model: CORE-2 (partial) 0.2219" in md and "- Final chat model (chat_eval_sft): ChatCORE-2 (partial) 0.1317" in md
    # the environment the flow recorded when it started (runs/<id>.json), and the code that made each artifact
    assert "- Code: 0.1.0+abc1234 (the flow) · artifacts: 0.1.0+abc1234 (all 9 artifacts)" in md
    assert ("- Machine: Python 3.11.7 · Linux-6.1-x86_64 · 16 CPUs · 251.4 GB memory · GPUs: 8× NVIDIA H100 80GB HBM3 "
            "(81559 MiB)\n") in md
    assert "- Packages: prefect 3.9.1, torch 2.13.0" in md and "flow run gifted-otter" in md
    assert "- Host: node-1 · artifacts made on" in md  # the manifests were committed on this machine, not node-1
    json.dumps(c)  # report.json: plain JSON


def test_a_run_that_stopped_early_gets_a_card_of_what_it_did(store):
    c = report.card(connect(store), STOPPED, dag=DAG)
    assert [(s["stage"], s["result"]) for s in c["stages"]] == [("data", "cached"), ("tokenizer", "cached"), ("base", "failed")]
    assert c["not_run"] == DAG[3:]
    assert c["models"] == {"columns": [], "rows": []}
    assert c["totals"]["failures"] == 1 and c["totals"]["cost_usd"] == pytest.approx(4.0)  # 600 s × 8 × $3/h
    md = report.markdown(c)
    assert "### base · failed · 10 m 00 s · $4.00\n\n8×H100 · $3.00/device-hour (built-in) · 1.33 device-hours · key " in md
    assert c["stages"][2]["kind"] == "" and c["stages"][2]["code_version"] == ""  # the key's artifact is another run's
    assert "Failed: `OutOfMemoryError: CUDA out of memory | tried to allocate 2 GiB`" in md
    assert "the run stopped: base failed" in md and "No model was scored in this run." in md
    assert "no score yet" in md.splitlines()[2]
    assert "- Machine and packages: not recorded" in md


def test_a_run_with_a_record_but_no_ledger_row_yet(store):
    ledger.record_run(store, "fresh", {"preset": "tiny", "started": T0.isoformat(), "host": "h", "config": {}})
    md = report.markdown(report.card(connect(store), "fresh"))
    assert "No stage of this run is in the ledger yet" in md


def test_unknown_run_is_a_one_line_error_naming_how_to_list_runs(store):
    with pytest.raises(report.UnknownRun) as e:
        report.card(connect(store), "nope")
    assert "\n" not in str(e.value) and "no run 'nope'" in str(e.value)
    assert "chatforge artifacts query 'select run_id from runs'" in str(e.value)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_cli_report_prints_the_card_of_a_run_the_newest_by_default_and_refuses_unknown_ids(store, tmp_path):
    r = cli("report", FULL, "--store", store.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"# chatforge report card: run {FULL}\n") and "## Summary" in r.stdout
    assert "rl, chat_eval_rl, report (the run did not reach them" in r.stdout  # the flow's DAG names what it did not reach
    newest = cli("report", "--store", store.url)
    assert newest.returncode == 0 and newest.stdout.startswith(f"# chatforge report card: run {STOPPED}\n"), newest.stderr
    assert "the run stopped: base failed" in newest.stdout
    bad = cli("report", "nope", "--store", store.url)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"chatforge: error: no run 'nope' in {store.url}: list the runs with "
        f"`chatforge artifacts query 'select run_id from runs' --store {store.url}`"]
    empty = cli("report", "--store", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "no run in" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1
