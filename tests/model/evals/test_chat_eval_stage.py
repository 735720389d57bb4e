"""The chat_eval entry point on a real (tiny) checkpoint: every task runs, partial suites are named so, ranks agree."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.config import ChatEvalConfig, ChatEvalsetConfig
from model.evals.evalsets import build_chat
from tasks.launch import launch

ITEMS = {
    "arc_easy": [{"id": f"a{i}", "question": f"Which is {w}?", "choices": ["red", "blue", w, "cat"], "answer": 2, "subject": ""}
                 for i, w in enumerate(["sun", "moon", "star", "dog"])],
    "mmlu": [{"id": "m0", "question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"},
             {"id": "m1", "question": "Sky?", "choices": ["blue", "green"], "answer": 0, "subject": "x"}],
    "gsm8k": [{"id": "g0", "question": "Tom has 2 apples and buys 3. How many?", "solution": "2+3=5\n#### 5", "answer": "5"}],
    "humaneval": [{"id": "HumanEval/0", "prompt": "def inc(x):\n    \"\"\"Add one.\"\"\"\n", "canonical_solution": "    return x + 1\n",
                   "test": "def check(candidate):\n    assert candidate(1) == 2\n", "entry_point": "inc"}],
    "spellingbee": [{"id": "s0", "word": "letter", "letter": "t", "answer": 2,
                     "question": "How many times does the letter 't' appear in the word 'letter'?"}],
}


def evalset(root: Path, names) -> Path:
    src = root / "src"
    src.mkdir(parents=True)
    for name in names:
        (src / f"{name}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS.get(name) or ITEMS["arc_easy"]))
    build_chat(ChatEvalsetConfig(source="none", local_dir=str(src), spellingbee_items=0), root / "artifact", root / "dl",
               log=lambda m: None)
    return root / "artifact"


def run(ckpt: Path, sets: Path, out: Path, nproc: int = 1) -> dict:
    spec = {"config": ChatEvalConfig(max_new_tokens=6, batch_size=3, device="cpu").model_dump(mode="json"),
            "checkpoint_dir": str(ckpt), "evalset_dir": str(sets), "out_dir": str(out)}
    return launch("model.evals.chat_eval", spec, out.parent / f"{out.name}-launch", nproc=nproc, log=lambda m: None)


def test_all_six_tasks_make_chatcore(tiny_checkpoint, tmp_path):
    sets = evalset(tmp_path / "es", ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval", "spellingbee"])
    metrics = run(tiny_checkpoint, sets, tmp_path / "out")
    assert metrics["score_name"] == "ChatCORE" and metrics["chat_tasks"] == 6
    result = json.loads((tmp_path / "out/chat_eval.json").read_text())
    rows = result["tasks"]
    assert rows["arc_easy"]["n"] == 4 and rows["arc_easy"]["baseline"] == pytest.approx(0.25)
    assert rows["mmlu"]["baseline"] == pytest.approx((0.25 + 0.5) / 2)
    assert sum(rows["humaneval"]["statuses"].values()) == 1  # the random model's program ran in the sandbox
    assert metrics["score"] == pytest.approx(sum(r["centered"] for r in rows.values()) / 6)
    report = (tmp_path / "out/report.md").read_text()
    assert report.startswith("**ChatCORE:") and "checkpoint: base" in report
    assert len(json.loads((tmp_path / "out/chat_table.json").read_text())) == 6
    evals = json.loads((tmp_path / "out/evals.json").read_text())
    assert sum(r["metric"] == "centered" and r["status"] == "ok" for r in evals) == 6
    assert [r["suite"] for r in evals if r["metric"] == "mean_centered"] == ["ChatCORE"]


def test_missing_sets_make_a_partial_suite_and_ranks_agree(tiny_checkpoint, tmp_path):
    sets = evalset(tmp_path / "es", ["arc_easy", "gsm8k"])
    one = run(tiny_checkpoint, sets, tmp_path / "one")
    assert one["score_name"] == "ChatCORE-2 (partial)"
    assert set(one["chat_missing"]) == {"arc_challenge", "mmlu", "humaneval", "spellingbee"}
    report = (tmp_path / "one/report.md").read_text()
    assert "**ChatCORE:" not in report and "| mmlu | | | not run: data unavailable" in report
    two = run(tiny_checkpoint, sets, tmp_path / "two", nproc=2)
    assert two["world_size"] == 2 and two["score"] == pytest.approx(one["score"])
    a = json.loads((tmp_path / "one/chat_eval.json").read_text())["tasks"]
    b = json.loads((tmp_path / "two/chat_eval.json").read_text())["tasks"]
    assert {t: (r.get("correct"), r.get("n")) for t, r in a.items()} == {t: (r.get("correct"), r.get("n")) for t, r in b.items()}
