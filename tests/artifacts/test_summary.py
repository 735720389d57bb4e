"""The run summary (`chatforge run`'s last lines) and `chatforge artifacts show` on a hand-built store."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from artifacts import ledger
from artifacts.manifest import Manifest
from artifacts.store import Store
from artifacts.summary import describe, run_summary, seconds, value

RUN = "0b5e5c1e-0000-4000-8000-000000000001"
HINTS = {"core_evalset": "CHATFORGE_EVAL_DIR=DIR with DIR/core/<task>.jsonl"}


def key(stage: str) -> str:
    return (stage.encode().hex() * 64)[:64]


def commit(store: Store, stage: str, kind: str, files: dict[str, object], metrics: dict, parents=(), config=None) -> str:
    k = key(stage)
    with store.staging(k) as tmp:
        for rel, body in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(body if isinstance(body, str) else json.dumps(body))
        store.commit(tmp, Manifest(key=k, kind=kind, stage=stage, config=config or {"n": 1}, parents={p: key(p) for p in parents},
                                   code={"fingerprint": "f" * 64, "version": "0.1.0+abc"}, metrics=metrics, wall_seconds=2.0))
    store.set_ref(f"{stage}/latest", k)
    store.set_ref(f"{stage}/tiny", k)
    return k


def row(stage: str, t: int, seconds: float, hit=False, status="completed", metrics=None, device="cpu", devices=1, price=0.0):
    start = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=t)
    return ledger.LedgerRow(run_id=RUN, stage=stage, key=key(stage), cache_hit=hit, start=start.isoformat(),
                            end=(start + timedelta(seconds=seconds)).isoformat(), wall_seconds=seconds, device_type=device,
                            devices=devices, nodes=1, price_per_device_hour=price, status=status, preset="tiny",
                            metrics=metrics or {})


CORE_MISSING = ["squad", "coqa"]
BASE_EVAL = {"score": 0.1234, "score_name": "CORE-2 (partial)", "core_tasks": 2, "core_missing": CORE_MISSING,
             "val_bpb": 1.5, "train_bpb": 1.4}
CHAT_EVAL = {"score": None, "score_name": "ChatCORE-0 (partial)", "chat_tasks": 0, "chat_missing": ["arc_easy", "gsm8k"],
             "items_per_s": {}, "sandbox": {"audit_hook": True, "rlimits": ["RLIMIT_AS"]}}
BASE = {"val_bpb": 2.25, "steps": 12, "tokens_per_s": 89.28, "resumed_from": [], "mfu": None}


@pytest.fixture
def store(tmp_path) -> Store:
    """Every kind of artifact, and a run in which data was cached, base ran on 8 GPUs after a failed try."""
    s = Store(str(tmp_path / "store"))
    commit(s, "data", "dataset", {"train_00000.parquet": "x" * 2000}, {"docs": {"train": 2862, "val": 138}, "split": "hash",
                                                                       "provenance": [{"kind": "local", "docs": 3000}]},
           config={"sources": [{"kind": "local", "paths": ["/x/docs.jsonl"]}], "val_fraction": 0.05})
    commit(s, "core_evalset", "evalset", {"sets.json": {
        "copa": {"status": "ok", "items": 2, "sha256": "a" * 64, "source": "local directory (2 files)"},
        "squad": {"status": "not run: data unavailable", "reason": "not in the source"},
        "coqa": {"status": "not run: data unavailable", "reason": "not in the source"}}, "sets/copa.jsonl": "{}\n"},
        {"sets": 1, "items": 2, "available": ["copa"], "unavailable": CORE_MISSING})
    commit(s, "chat_evalset", "evalset", {"sets.json": {
        "arc_easy": {"status": "not run: data unavailable", "reason": "no source configured"},
        "gsm8k": {"status": "not run: data unavailable", "reason": "no source configured"}}},
        {"sets": 0, "items": 0, "available": [], "unavailable": ["arc_easy", "gsm8k"]})
    commit(s, "decontam", "report", {"decontam.md": "13-gram overlap\n\n| set | items |\n|---|---:|\n| copa | 2 |\n"},
           {"contaminated": 0, "contaminated_by_set": {}}, parents=("data", "core_evalset", "chat_evalset"))
    commit(s, "tokenizer", "tokenizer", {"tokenizer.json": "{}", "compression.md": "| source | ours |\n|---|---|\n| train | 3.4 |\n"},
           {"vocab_size": 1024, "compression": {"sources": {"train": {"bytes": 200000, "ours": 3.3981}}, "available": {}}},
           parents=("data",))
    commit(s, "base", "checkpoint", {
        "model.safetensors": "w" * 5000, "model.json": {"model": {"n_layer": 2, "n_embd": 128}, "step": 12},
        "curve.json": {"val": [{"step": 0, "val_bpb": 2.97}, {"step": 12, "val_bpb": 2.25}]},
        "samples.json": [{"step": 12, "samples": [{"prompt": "The capital of France is", "completion": " Paris."}]}]},
        BASE, parents=("data", "tokenizer"))
    commit(s, "base_eval", "eval", {
        "report.md": "**CORE-2 (partial): 0.1234**\n\n| task | centered |\n|---|---|\n| copa | 0.2468 |\n",
        "core_table.json": [{"task": "copa", "centered": 0.2468}], "samples.json": [{"prompt": "2 + 2 =", "completion": " 4"}]},
        BASE_EVAL, parents=("data", "base", "core_evalset"))
    commit(s, "chat_eval", "eval", {"report.md": "**ChatCORE: not run: data unavailable**\n"}, CHAT_EVAL,
           parents=("base", "chat_evalset"))
    ledger.record_run(s, RUN, {"preset": "tiny", "started": "2026-01-01T00:00:00+00:00", "host": "h", "config": {}})
    for r in [row("data", 0, 0.2, hit=True, metrics={"docs": {"train": 2862}}),
              row("core_evalset", 1, 0.1, hit=True), row("chat_evalset", 2, 0.1, hit=True), row("decontam", 3, 0.3, hit=True),
              row("tokenizer", 4, 1.0), row("base", 5, 1800.0, status="failed", device="H100", devices=8, price=3.0),
              row("base", 2000, 3600.0, metrics=BASE, device="H100", devices=8, price=3.0),
              row("base_eval", 6000, 360.0, metrics=BASE_EVAL, device="H100", devices=8, price=3.0),
              row("chat_eval", 7000, 30.0, metrics=CHAT_EVAL)]:
        ledger.append(s, r)
    ledger.append(s, row("base", 0, 5.0).__class__(**{**row("base", 0, 5.0).__dict__, "run_id": "another-run"}))
    return s


def test_formatting_helpers():
    assert [seconds(x) for x in (0.04, 59.96, 125, 3 * 3600 + 120)] == ["0.0 s", "60.0 s", "2 m 05 s", "3 h 02 m"]
    assert value(1234567) == "1,234,567" and value(2.221079) == "2.2211" and value(None) == "—" and value(1e-10) == "1e-10"
    assert value(list(range(20))).endswith("… (+8 more)") and value([]) == "none" and value(True) == "yes"


def test_run_summary_lists_stages_from_the_ledger_with_scores_and_next_commands(store):
    text = run_summary(store, RUN, hints=HINTS, store_arg=store.url, elapsed=5821.0)
    lines = text.splitlines()
    assert lines[0].startswith(f"── chatforge run {RUN}")
    table = {m[1]: m for m in (re.match(r"^  (\S+)\s+(computed|cached|failed)\b(.*)\s([0-9a-f]{12})(  \(.*\))?$", ln) for ln in lines) if m}
    assert list(table) == ["data", "core_evalset", "chat_evalset", "decontam", "tokenizer", "base", "base_eval", "chat_eval"]
    assert {s: table[s][2] for s in ("data", "tokenizer", "base")} == {"data": "cached", "tokenizer": "computed", "base": "computed"}
    assert table["base"][4] == key("base")[:12] and "2 tries" in table["base"][5] and "8×H100" in table["base"][3]
    # base: 1800 s failed + 3600 s, on 8 GPUs at $3 per device-hour = $12 + $24; base_eval 360 s = $2.40
    assert "1 h 30 m" in table["base"][3] and "$36.00" in table["base"][3] and "$2.40" in table["base_eval"][3]
    assert lines[0].startswith(f"── chatforge run {RUN} (tiny) · 8 stages: 4 computed, 4 cached · 1 h 37 m end to end ───")
    total = next(ln for ln in lines if ln.startswith("  total"))
    assert "1 h 36 m" in total and "$38.40" in total and "12.8 device-hours" in total
    assert "another-run" not in text

    scores = text[text.index("\nscores\n"):text.index("\nartifacts ")]
    assert "base          val bpb 2.2500" in scores
    assert "base_eval     CORE-2 (partial) 0.1234 · val bpb 1.5000" in scores
    assert "2 not run (data unavailable): squad, coqa" in scores and "core_evalset has no data for them (not in the source)" in scores
    assert "to add them: CHATFORGE_EVAL_DIR=DIR with DIR/core/<task>.jsonl" in scores
    assert "chat_eval     ChatCORE not run: data unavailable" in scores
    assert "why: chat_evalset has no data (no source configured)" in scores
    assert "to score ChatCORE" not in scores  # no hint was given for chat_evalset

    assert f"artifacts  {store.url}" in text
    nxt = lines[lines.index("next") + 1:]
    opt = f"--store {store.url}"
    assert nxt[0].startswith(f"  chatforge chat --model base/latest {opt}")
    assert nxt[1].startswith(f"  chatforge serve --model base/latest {opt}")
    assert nxt[2].startswith(f"  chatforge artifacts show base_eval/latest {opt}")
    assert nxt[3].startswith(f"  chatforge artifacts show chat_eval/latest {opt}")
    assert nxt[4].startswith(f"  chatforge artifacts show decontam/latest --report {opt}")
    assert nxt[5].startswith(f"  chatforge report {RUN} {opt}") and "report card" in nxt[5]
    assert f"where run_id = '{RUN}'" in nxt[6] and len(nxt) == 7


def test_run_summary_names_keys_when_a_ref_moved_on_and_tells_how_to_continue_an_until_run(store):
    store.set_ref("base/latest", key("data"))  # a later run replaced base/latest
    text = run_summary(store, RUN, until="chat_eval", not_run=["mid", "sft"])
    assert f"chatforge chat --model {key('base')[:12]}  " in text and "--store" not in text
    assert "the same command without --until chat_eval goes on to mid, sft" in text


def test_run_summary_of_an_until_run_without_checkpoint(tmp_path):
    s = Store(str(tmp_path / "store"))
    commit(s, "data", "dataset", {"a.parquet": "x"}, {})
    commit(s, "tokenizer", "tokenizer", {"tokenizer.json": "{}"}, {}, parents=("data",))
    ledger.append(s, row("data", 0, 3.0))
    ledger.append(s, row("tokenizer", 5, 1.0, hit=True))
    text = run_summary(s, RUN, until="tokenizer", not_run=["base", "base_eval"])
    assert "scores" not in text and "chatforge chat" not in text
    assert "  chatforge artifacts show tokenizer/latest" in text
    assert text.rstrip().endswith("goes on to base, base_eval; finished stages come from the store)")


def test_run_summary_counts_a_killed_attempt_as_interrupted_with_its_dollars(tmp_path):
    """base killed -9 after 20 minutes on 8 GPUs (its row stayed `running`; the heartbeat stopped long ago), then
    a retry in the same run that was killed too: both attempts' time and dollars are the run's."""
    s = Store(str(tmp_path / "store"))
    commit(s, "data", "dataset", {"a.parquet": "x"}, {})
    ledger.append(s, row("data", 0, 0.2, hit=True))
    for at, wall in ((10, 1200.0), (1300, 600.0)):
        r = row("base", at, wall, status="running", device="H100", devices=8, price=3.0)
        r.last_heartbeat = r.end
        ledger.append(s, r)
    text = run_summary(s, RUN, until="base")
    lines = text.splitlines()
    assert lines[0].startswith(f"── chatforge run {RUN} · 2 stages: 1 cached, 1 interrupted ───")
    base = next(ln for ln in lines if ln.startswith("  base "))
    # (1200 + 600) s × 8 devices × $3 per device-hour = $12.00
    assert re.match(r"^  base\s+interrupted\s+30 m 00 s\s+\$12\.00  8×H100\s+[0-9a-f]{12}  \(2 tries; time and \$ of all\)$", base), base
    total = next(ln for ln in lines if ln.startswith("  total"))
    assert "$12.00" in total and "4 device-hours" in total
    assert "chatforge chat" not in text  # an interrupted attempt made no checkpoint to chat with


@pytest.mark.parametrize("stage", ["data", "tokenizer", "core_evalset", "decontam", "base", "base_eval", "chat_eval"])
def test_describe_every_kind(store, stage):
    text = describe(store, key(stage), hints=lambda: HINTS)
    m = store.get(key(stage))
    assert text.startswith(f"{stage} · {m.kind} · {m.key}\n")
    assert f"{stage}/latest, {stage}/tiny" in text and "0.1.0+abc" in text
    for rel, info in m.files.items():
        assert re.search(rf"^  {re.escape(rel)}\s+\S+ k?B$", text, re.M), rel
    for parent, pkey in m.parents.items():
        assert re.search(rf"^  {parent}\s+{pkey[:12]}\s+\w+\s+{parent}/latest, {parent}/tiny$", text, re.M)


def test_describe_shows_scores_reports_samples_and_nested_metrics(store):
    ev = describe(store, key("base_eval"), hints=HINTS)
    assert "scores   CORE-2 (partial) 0.1234 · val bpb 1.5000" in ev
    assert "── report.md" in ev and "| copa | 0.2468 |" in ev
    assert '"2 + 2 =" → " 4"' in ev
    assert re.search(r"^  core_missing\s+squad, coqa$", ev, re.M)
    chat = describe(store, key("chat_eval"), hints=lambda: {"chat_evalset": "CHATFORGE_EVAL_DIR=DIR with gsm8k_test.jsonl"})
    assert "ChatCORE not run: data unavailable" in chat and "to score ChatCORE: CHATFORGE_EVAL_DIR=DIR with gsm8k_test.jsonl" in chat
    assert re.search(r"^  sandbox\.audit_hook\s+yes$", chat, re.M) and re.search(r"^  items_per_s\s+none$", chat, re.M)
    tok = describe(store, key("tokenizer"))
    assert re.search(r"^  compression\.sources\.train\.ours\s+3\.3981$", tok, re.M) and "| train | 3.4 |" in tok
    base = describe(store, key("base"))
    assert "n_layer=2  n_embd=128  (step 12)" in base and "0: 2.9700  ·  12: 2.2500" in base
    assert '"The capital of France is" → " Paris."' in base and re.search(r"^  mfu\s+—$", base, re.M)
    data = describe(store, key("data"))
    assert "lineage  none" in data and 'sources=[{"kind":"local","paths":["/x/docs.jsonl"]}]  val_fraction=0.05' in data
    assert re.search(r"^  provenance\[0\]\.docs\s+3,000$", data, re.M)
    sets = describe(store, key("core_evalset"))
    assert re.search(r"^  squad\s+not run: data unavailable \(not in the source\)$", sets, re.M)
    assert re.search(r"^  copa\s+2 items · local directory \(2 files\) · sha256 aaaaaaaaaaaa$", sets, re.M)


def test_cli_show_summary_json_and_report(store, capsys):
    from flows.cli import main

    assert main(["artifacts", "show", "base_eval/latest", "--store", store.url]) == 0
    assert capsys.readouterr().out.startswith(f"base_eval · eval · {key('base_eval')}")
    assert main(["artifacts", "show", key("base"), "--store", store.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == store.get(key("base")).to_dict()
    assert main(["artifacts", "show", "tokenizer/latest", "--store", store.url, "--report"]) == 0
    assert capsys.readouterr().out.startswith(f"## tokenizer {key('tokenizer')[:12]}: compression.md")
    for stage in ("data", "core_evalset", "chat_evalset", "decontam", "base", "chat_eval"):
        assert main(["artifacts", "show", f"{stage}/latest", "--store", store.url]) == 0
        assert capsys.readouterr().out.startswith(f"{stage} · ")


def test_no_hint_when_the_reason_names_the_setting(tmp_path):
    s = Store(str(tmp_path / "store"))
    commit(s, "chat_evalset", "evalset", {"sets.json": {
        "gsm8k": {"status": "ok", "items": 1, "sha256": "b" * 64, "source": "local"},
        "spellingbee": {"status": "not run: data unavailable", "reason": "chat_evalset.spellingbee_items is 0"}}}, {})
    commit(s, "chat_eval", "eval", {}, {"score": 0.5, "score_name": "ChatCORE-1 (partial)", "chat_missing": ["spellingbee"]},
           parents=("chat_evalset",))
    text = describe(s, key("chat_eval"), hints={"chat_evalset": "CHATFORGE_EVAL_DIR=DIR"})
    assert "1 not run (data unavailable): spellingbee" in text
    assert "why: chat_evalset has no data for them (chat_evalset.spellingbee_items is 0)" in text
    assert "CHATFORGE_EVAL_DIR" not in text


def test_evals_of_one_evalset_explain_a_missing_set_once(tmp_path):
    s = Store(str(tmp_path / "store"))
    commit(s, "chat_evalset", "evalset", {"sets.json": {
        "gsm8k": {"status": "ok", "items": 1, "sha256": "b" * 64, "source": "local"},
        "arc_easy": {"status": "not run: data unavailable", "reason": "no pypi source has it and no local file"}}}, {})
    metrics = {"score": 0.5, "score_name": "ChatCORE-1 (partial)", "chat_missing": ["arc_easy"]}
    for i, stage in enumerate(("chat_eval_base", "chat_eval_sft")):
        commit(s, stage, "eval", {}, metrics, parents=("chat_evalset",))
        ledger.append(s, row(stage, i, 10.0, metrics=metrics))
    text = run_summary(s, RUN, hints={"chat_evalset": "CHATFORGE_EVAL_DIR=DIR"})
    assert text.count("why: chat_evalset has no data for them") == 1 and text.count("CHATFORGE_EVAL_DIR=DIR") == 1
    assert "1 not run (data unavailable): arc_easy · why and how: as for chat_eval_base" in text
