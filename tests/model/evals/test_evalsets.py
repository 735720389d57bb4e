"""Eval sets as artifacts: every source format normalizes to the same items; keys follow content, not paths."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.evals import evalsets
from model.config import ChatEvalsetConfig, CoreEvalsetConfig
from model.evals.core_tasks import NOT_RUN, load_task_list
from model.errors import InputError
from tests.helpers import shared_data

ARC_HUB = [{"id": "Mercury_1", "question": "Which is a gas?", "choices": {"text": ["rock", "steam", "ice"], "label": ["A", "B", "C"]}, "answerKey": "B"},
           {"id": "Mercury_2", "question": "Two plus two?", "choices": {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}]
MMLU_HUB = [{"question": "What is 2p if p = 3?", "subject": "elementary_mathematics", "choices": ["5", "6", "7", "8"], "answer": 1}]
GSM_HUB = [{"question": "Tom has 3 apples and buys 1,000 more. How many?", "answer": "3 + 1000 = <<3+1000=1003>>1003\n#### 1,003"}]
HE_HUB = [{"task_id": "HumanEval/0", "prompt": "def inc(x):\n    \"\"\"Add one.\"\"\"\n", "canonical_solution": "    return x + 1\n",
           "test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "inc"}]


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def hub_layout(root: Path) -> Path:
    _parquet(root / "ARC-Easy/test-00000-of-00001.parquet", ARC_HUB)
    _parquet(root / "all/test-00000-of-00001.parquet", MMLU_HUB)
    _parquet(root / "main/test-00000-of-00001.parquet", GSM_HUB)
    _parquet(root / "openai_humaneval/test-00000-of-00001.parquet", HE_HUB)
    return root


def check_normalized(sets: dict) -> None:
    assert sets["arc_easy"][0] == {"id": "Mercury_1", "question": "Which is a gas?", "choices": ["rock", "steam", "ice"], "answer": 1, "subject": ""}
    assert sets["arc_easy"][1]["answer"] == 1  # numeric labels "1".."4"
    assert sets["mmlu"][0]["answer"] == 1 and sets["mmlu"][0]["subject"] == "elementary_mathematics"
    assert sets["gsm8k"][0]["answer"] == "1003" and sets["gsm8k"][0]["solution"].endswith("#### 1,003")
    assert sets["humaneval"][0]["entry_point"] == "inc" and sets["humaneval"][0]["id"] == "HumanEval/0"


def test_local_hub_layout_normalizes_and_marks_missing_sets(tmp_path):
    root = hub_layout(tmp_path / "evals")
    cfg = ChatEvalsetConfig(source="none", local_dir=str(root), spellingbee_items=0)
    metrics = evalsets.build_chat(cfg, tmp_path / "out", tmp_path / "dl", log=lambda m: None)
    assert metrics["available"] == ["arc_easy", "gsm8k", "humaneval", "mmlu"]
    sets = evalsets.load_sets(tmp_path / "out")
    check_normalized(sets)
    assert sets["arc_challenge"] is None and sets["spellingbee"] is None
    meta = json.loads((tmp_path / "out/sets.json").read_text())
    assert meta["arc_challenge"]["status"] == NOT_RUN
    assert len(meta["mmlu"]["sha256"]) == 64


def test_hub_source_reads_the_hubs_files(tmp_path, monkeypatch):
    """The Hub path, on local files in the Hub's layout (no network here)."""
    root = hub_layout(tmp_path / "hub")
    asked = []

    def fake_download(repo, filename, revision, cache_dir):
        asked.append((repo, filename, revision))
        path = root / filename.replace("ARC-Challenge", "ARC-Easy")
        return path

    import model.data.sources
    monkeypatch.setattr(model.data.sources, "hub_download", fake_download)
    monkeypatch.delenv(evalsets.EVAL_DIR_ENV, raising=False)
    cfg = ChatEvalsetConfig(source="hub", hub_revision="r1", spellingbee_items=0)
    evalsets.build_chat(cfg, tmp_path / "out", tmp_path / "dl", log=lambda m: None)
    check_normalized(evalsets.load_sets(tmp_path / "out"))
    assert ("allenai/ai2_arc", "ARC-Challenge/test-00000-of-00001.parquet", "r1") in asked
    assert {r for r, _, _ in asked} == {"allenai/ai2_arc", "cais/mmlu", "openai/gsm8k", "openai/openai_humaneval"}


def test_malformed_file_is_a_one_line_error(tmp_path):
    root = tmp_path / "evals"
    root.mkdir()
    (root / "gsm8k.jsonl").write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    cfg = ChatEvalsetConfig(source="none", local_dir=str(root), spellingbee_items=0)
    with pytest.raises(InputError, match=r"gsm8k.jsonl record 1 is not a gsm8k item .*####") as e:
        evalsets.build_chat(cfg, tmp_path / "out", tmp_path / "dl", log=lambda m: None)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="not a directory"):
        evalsets.chat_dir(ChatEvalsetConfig(local_dir=str(tmp_path / "nope")))


def test_header_rows_are_not_items(tmp_path):
    root = tmp_path / "evals"
    root.mkdir()
    rows = [{"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
             "answer_d": "answer_d", "correct_answer": "answer", "topic": "x"},
            {"question": "Sky?", "answer_a": "blue", "answer_b": "red", "answer_c": "green", "answer_d": "pink",
             "correct_answer": "A", "topic": "colors"}]
    (root / "mmlu_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evalsets.build_chat(ChatEvalsetConfig(source="none", local_dir=str(root), spellingbee_items=0),
                        tmp_path / "out", tmp_path / "dl", log=lambda m: None)
    assert evalsets.load_sets(tmp_path / "out")["mmlu"] == [
        {"id": "mmlu/1", "question": "Sky?", "choices": ["blue", "red", "green", "pink"], "answer": 0, "subject": "colors"}]


def test_stage_key_follows_content_not_path(tmp_path, monkeypatch):
    from flows.presets import tiny
    from tasks.registry import STAGES
    from tasks.stage import plan

    monkeypatch.delenv(evalsets.EVAL_DIR_ENV, raising=False)
    a = hub_layout(tmp_path / "a")
    b = tmp_path / "somewhere" / "else"
    shutil.copytree(a, b)

    def keys(path: Path) -> dict:
        cfg = tiny()
        cfg.chat_evalset.local_dir = str(path)
        cfg.core_evalset.local_dir = str(path)
        return plan(STAGES, cfg)

    ka, kb = keys(a), keys(b)
    assert ka["chat_evalset"] == kb["chat_evalset"] and ka["core_evalset"] == kb["core_evalset"]
    _parquet(b / "main/test-00000-of-00001.parquet", GSM_HUB * 2)
    kc = keys(b)
    assert kc["chat_evalset"] != ka["chat_evalset"]
    assert kc["core_evalset"] == ka["core_evalset"] and kc["data"] == ka["data"]


def _bundle(tmp_path: Path) -> Path:
    core_yaml = (
        "icl_tasks:\n"
        "- label: copa\n  dataset_uri: eval_data/commonsense_reasoning/copa.jsonl\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
        "- label: jeopardy\n  dataset_uri: eval_data/world_knowledge/jeopardy_all.jsonl\n  num_fewshot: [10]\n"
        "  icl_task_type: language_modeling\n  continuation_delimiter: \"\\nAnswer: \"\n"
    )
    path = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("eval_bundle/core.yaml", core_yaml)
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Task Category,Task Type,#shots,Random baseline\ncopa,x,multiple choice,0,50\n")
        z.writestr("eval_bundle/eval_data/commonsense_reasoning/copa.jsonl",
                   json.dumps({"query": "The man fell", "choices": ["because he slipped", "so he ate"], "gold": 0}) + "\n")
        z.writestr("../evil.jsonl", "{}\n")
    return path


def test_core_bundle_from_url(tmp_path):
    bundle = _bundle(tmp_path)
    cfg = CoreEvalsetConfig(url=bundle.as_uri())
    metrics = evalsets.build_core(cfg, tmp_path / "out", tmp_path / "dl", log=lambda m: None)
    assert metrics["available"] == ["copa"]
    assert (tmp_path / "out/core.yaml").exists() and (tmp_path / "out/eval_meta_data.csv").exists()
    assert not (tmp_path / "dl/evil.jsonl").exists() and not (tmp_path / "evil.jsonl").exists()
    tasks = load_task_list(tmp_path / "out/core.yaml")
    assert [(t.label, t.dataset, t.kind, t.shots, t.delimiter) for t in tasks] == [
        ("copa", "copa", "mc", 0, " "), ("jeopardy", "jeopardy_all", "lm", 10, "\nAnswer: ")]
    meta = json.loads((tmp_path / "out/sets.json").read_text())
    assert meta["copa"]["items"] == 1 and meta["jeopardy_all"]["status"] == NOT_RUN

    with pytest.raises(InputError, match="expected 00"):
        evalsets.build_core(CoreEvalsetConfig(url=bundle.as_uri(), url_sha256="00" * 32), tmp_path / "out2", tmp_path / "dl2")
    with pytest.raises(InputError, match=r"downloading .* failed .*local_dir"):
        evalsets.build_core(CoreEvalsetConfig(url="http://127.0.0.1:9/eval_bundle.zip"), tmp_path / "out3", tmp_path / "dl3")


def test_no_core_source_means_every_task_unavailable(tmp_path, monkeypatch):
    monkeypatch.delenv(evalsets.EVAL_DIR_ENV, raising=False)
    metrics = evalsets.build_core(CoreEvalsetConfig(url=None), tmp_path / "out", tmp_path / "dl", log=lambda m: None)
    assert metrics["sets"] == 0 and "copa" in metrics["unavailable"]


def test_shared_data_sets(tmp_path):
    data = shared_data() / "eval"
    m = evalsets.build_core(CoreEvalsetConfig(url=None, local_dir=str(data / "core")), tmp_path / "core", tmp_path / "dl", log=lambda m: None)
    assert m["sets"] == 18 and m["unavailable"] == ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]  # task labels
    m = evalsets.build_chat(ChatEvalsetConfig(source="none", local_dir=str(data), spellingbee_items=0),
                            tmp_path / "chat", tmp_path / "dl", log=lambda m: None)
    sets = evalsets.load_sets(tmp_path / "chat")
    assert {k: len(v) for k, v in sets.items() if v} == {"arc_easy": 2376, "arc_challenge": 1172, "mmlu": 14042,
                                                         "gsm8k": 1319, "humaneval": 164}
    assert sets["gsm8k"][0]["answer"] == "18"


def _base_eval_not_run(evalset_dir: Path, monkeypatch) -> list[str]:
    """The tasks base_eval reports as not run on an evalset artifact (its `core_missing`): base_eval's own
    task selection (core.yaml or the built-in list, files in sets/), with scoring stubbed out."""
    from types import SimpleNamespace

    from model.evals import base_eval, core_eval

    monkeypatch.setattr(core_eval, "evaluate_task", lambda model, tok, items, task, *a, **k: {
        "task": task.label, "status": "ok", "centered": 0.0, "n": len(items)})
    rt = SimpleNamespace(main=False, device="cpu", rank=0, world_size=1, distributed=False, sum_across_ranks=None)
    return base_eval.run_core(None, None, evalset_dir, 1, rt)["aggregate"]["missing"]


def test_core_evalset_and_base_eval_name_missing_tasks_alike(tmp_path, monkeypatch):
    """Missing CORE tasks are named by task label in both stages: hellaswag's file serves two tasks
    (hellaswag_zeroshot and hellaswag), and jeopardy's and winograd's files are jeopardy_all and winograd_wsc."""
    monkeypatch.delenv(evalsets.EVAL_DIR_ENV, raising=False)
    src = tmp_path / "core"
    src.mkdir()
    for stem in ("copa", "winograd_wsc", "arc_easy"):
        (src / f"{stem}.jsonl").write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    m = evalsets.build_core(CoreEvalsetConfig(url=None, local_dir=str(src)), tmp_path / "local", tmp_path / "dl", log=lambda m: None)
    assert m["available"] == ["arc_easy", "copa", "winograd"]  # DCLM's order, labels
    assert "hellaswag_zeroshot" in m["unavailable"] and "jeopardy" in m["unavailable"] and len(m["unavailable"]) == 19
    assert m["unavailable"] == _base_eval_not_run(tmp_path / "local", monkeypatch)
    meta = json.loads((tmp_path / "local/sets.json").read_text())
    assert meta["hellaswag"]["tasks"] == ["hellaswag_zeroshot", "hellaswag"] and meta["winograd_wsc"]["tasks"] == ["winograd"]

    # a bundle's core.yaml is the task list of both stages
    m = evalsets.build_core(CoreEvalsetConfig(url=_bundle(tmp_path).as_uri()), tmp_path / "bundle", tmp_path / "dl", log=lambda m: None)
    assert m["available"] == ["copa"] and m["unavailable"] == ["jeopardy"] == _base_eval_not_run(tmp_path / "bundle", monkeypatch)


def test_shared_core_dir_missing_tasks_agree_with_base_eval(tmp_path, monkeypatch):
    data = shared_data() / "eval" / "core"
    m = evalsets.build_core(CoreEvalsetConfig(url=None, local_dir=str(data)), tmp_path / "core", tmp_path / "dl", log=lambda m: None)
    assert m["unavailable"] == _base_eval_not_run(tmp_path / "core", monkeypatch) == ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]


def test_a_core_yaml_that_is_not_a_task_list_is_an_input_error(tmp_path):
    src = tmp_path / "core"
    src.mkdir()
    (src / "core.yaml").write_text("icl_tasks:\n- label: copa\n  icl_task_type: guessing\n  dataset_uri: copa.jsonl\n")
    with pytest.raises(InputError, match="core.yaml of the CORE source is not a DCLM task list"):
        evalsets.build_core(CoreEvalsetConfig(url=None, local_dir=str(src)), tmp_path / "out", tmp_path / "dl", log=lambda m: None)
