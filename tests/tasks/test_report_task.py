"""The `report` stage: last in the DAG after every eval, keyed by the run it describes, run through the same
runner as every stage (lock, staging, atomic commit, ledger row) on a store whose eval artifacts are hand-made."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from artifacts import ledger
from artifacts.catalog import connect
from artifacts.manifest import Manifest
from artifacts.store import Store
from flows.overrides import build_config
from model.errors import InputError
from tasks import report
from tasks.registry import STAGES, get
from tasks.runner import execute
from tasks.stage import plan, upstream

ROOT = Path(__file__).resolve().parents[2]
RUN = "22222222-0000-4000-8000-000000000001"


def test_report_is_the_last_stage_and_takes_every_eval():
    st = STAGES[-1]
    assert st is report.STAGE and get("report") is st
    assert (st.kind, st.section, st.reports) == ("report", "report", ("report.md",))
    evals = {s.name for s in STAGES if s.kind == "eval"}
    assert evals == {"base_eval", "chat_eval_base", "chat_eval_mid", "chat_eval_sft", "chat_eval_rl"}
    assert set(st.inputs) == evals | {"decontam"}
    assert [s.name for s in upstream(STAGES, "report")] == [s.name for s in STAGES]  # `--until report` = the whole flow


def test_each_run_gets_its_own_card_key_and_nothing_else_changes():
    cfg = build_config("tiny")
    a, b = cfg.model_copy(deep=True), cfg.model_copy(deep=True)
    a.report.run_id, b.report.run_id = "run-a", "run-b"
    ka, kb = plan(STAGES, a), plan(STAGES, b)
    assert ka["report"] != kb["report"]
    assert {k: v for k, v in ka.items() if k != "report"} == {k: v for k, v in kb.items() if k != "report"}
    assert a.model_dump()["report"]["run_id"] == "run-a" and "run_id" in report.STAGE.config(a).key_dict()


def _store_with_evals(tmp_path, cfg) -> tuple[Store, dict[str, str]]:
    """The report's inputs committed under the keys the config plans, and a run's ledger rows for them."""
    store = Store(str(tmp_path / "store"))
    keys = plan(STAGES, cfg)
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    for i, name in enumerate(report.STAGE.inputs):
        metrics = {"score": 0.1 * i, "score_name": "ChatCORE-1 (partial)"} if name.startswith("chat_eval") else {"contaminated": 0}
        with store.staging(keys[name]) as tmp:
            (tmp / "x.txt").write_text(name)
            store.commit(tmp, Manifest(key=keys[name], kind=get(name).kind, stage=name, config={}, parents={}, code={},
                                       metrics=metrics))
        start = t0 + timedelta(seconds=10 * i)
        ledger.append(store, ledger.LedgerRow(
            run_id=RUN, stage=name, key=keys[name], cache_hit=False, start=start.isoformat(),
            end=(start + timedelta(seconds=5)).isoformat(), wall_seconds=5.0, device_type="cpu", devices=1, nodes=1,
            price_per_device_hour=0.0, preset="tiny", metrics=metrics))
    return store, keys


def test_the_stage_writes_the_card_of_its_run_and_a_rerun_of_that_run_is_a_cache_hit(tmp_path):
    cfg = build_config("tiny")
    cfg.report.run_id = RUN
    store, keys = _store_with_evals(tmp_path, cfg)
    out = execute(report.STAGE, cfg, store, keys, RUN, log=lambda m: None)
    assert not out.cache_hit and out.manifest.key == keys["report"] and out.manifest.config["run_id"] == RUN
    d = store.local_path(keys["report"])
    md, card = (d / "report.md").read_text(), json.loads((d / "report.json").read_text())
    assert md.startswith(f"# chatforge report card: run {RUN}\n") and "### chat_eval_rl · computed" in md
    assert card["run_id"] == RUN and [s["stage"] for s in card["stages"]] == list(report.STAGE.inputs)
    assert card["scores"]["chat_stage"] == "chat_eval_rl" and card["scores"]["chat_score"] == pytest.approx(0.5)
    # the stages the run did not reach, from the DAG (the card itself excepted: its row follows the card)
    assert "data" in card["not_run"] and "report" not in card["not_run"]
    assert out.manifest.metrics["run_id"] == RUN and out.manifest.metrics["stages"] == 6
    assert "score" not in out.manifest.metrics  # the card is not a score of its own
    again = execute(report.STAGE, cfg, store, keys, RUN, log=lambda m: None)
    assert again.cache_hit
    rows = connect(store).execute("SELECT cache_hit FROM stage_runs WHERE stage = 'report' ORDER BY start").fetchall()
    assert rows == [(False,), (True,)]
    # the run's closing summary points at `chatforge report`, and at the decontamination report, not at the card
    from artifacts.summary import run_summary

    nxt = run_summary(store, RUN).split("\nnext\n")[1]
    assert f"  chatforge report {RUN}  " in nxt and f"show {keys['decontam'][:12]} --report" in nxt
    assert "report/latest" not in nxt


def test_the_stage_refuses_a_config_that_names_no_run(tmp_path):
    cfg = build_config("tiny")
    store, keys = _store_with_evals(tmp_path, cfg)
    with pytest.raises(InputError, match=r"chatforge stage report --run RUN_ID"):
        execute(report.STAGE, cfg, store, keys, RUN, log=lambda m: None)
    assert store.manifest(keys["report"]) is None


def test_cli_stage_report_without_a_run_is_one_line_before_anything_starts(tmp_path, capsys):
    from flows.cli import main

    store = tmp_path / "store"
    assert main(["stage", "report", "--store", str(store)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chatforge: error: stage report needs the run") and "--run RUN_ID" in err[0]
    assert not store.exists()


def test_environment_names_python_packages_and_code_without_importing_torch():
    import subprocess
    import sys

    env = report.environment()
    assert env["python"].count(".") == 2 and env["cpus"] >= 1 and env["code"]
    assert {"torch", "prefect", "duckdb", "pydantic"} <= set(env["packages"])
    assert isinstance(env["gpus"], list)
    json.dumps(env)
    # measured at every flow start: versions come from the installed metadata, torch is never imported for it
    probe = "import sys; from tasks.report import environment; environment(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip() == "False"
