"""The base_eval entry point: CORE over an evalset artifact, bits per byte, samples; ranks agree with one process."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from model.evals import core_eval
from model.config import BaseEvalConfig, CoreEvalsetConfig
from model.evals.evalsets import build_core
from tasks.launch import launch

WORDS = "red blue green cat dog bird one two three sun moon star".split()


def hand_made_core(root: Path) -> Path:
    """Three CORE task files (mc, schema, lm) in DCLM's ICL format, 30 items each."""
    rng = random.Random(0)
    root.mkdir(parents=True)
    with open(root / "copa.jsonl", "w") as f:
        for _ in range(30):
            a, b = rng.sample(WORDS, 2)
            f.write(json.dumps({"query": f"The {a} saw the", "choices": [b, a], "gold": rng.randint(0, 1)}) + "\n")
    with open(root / "winograd_wsc.jsonl", "w") as f:
        for _ in range(30):
            a, b = rng.sample(WORDS, 2)
            f.write(json.dumps({"context_options": [f"The {a} ran", f"The {b} ran"], "continuation": "fast.", "gold": 0}) + "\n")
    with open(root / "lambada_openai.jsonl", "w") as f:
        for _ in range(30):
            f.write(json.dumps({"context": " ".join(rng.sample(WORDS, 5)), "continuation": rng.choice(WORDS)}) + "\n")
    return root


@pytest.fixture(scope="module")
def evalset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("core-evalset")
    metrics = build_core(CoreEvalsetConfig(url=None, local_dir=str(hand_made_core(root / "src"))), root / "artifact", root / "dl",
                         log=lambda m: None)
    (root / "evalset_metrics.json").write_text(json.dumps(metrics))
    return root / "artifact"


def run(tiny_checkpoint: Path, evalset: Path, out: Path, nproc: int = 1, **cfg) -> dict:
    spec = {"config": BaseEvalConfig(bpb_tokens=1024, batch_size=4, sample_tokens=4, device="cpu", **cfg).model_dump(mode="json"),
            "checkpoint_dir": str(tiny_checkpoint), "dataset_dir": str(tiny_checkpoint.parent / "data"),
            "evalset_dir": str(evalset), "out_dir": str(out)}
    return launch("model.evals.base_eval", spec, out.parent / f"{out.name}-launch", nproc=nproc, log=lambda m: None)


def test_base_eval_writes_a_partial_core_and_bpb(tiny_checkpoint, evalset, tmp_path):
    metrics = run(tiny_checkpoint, evalset, tmp_path / "out", max_per_task=20)
    assert metrics["score_name"] == "CORE-3 (partial)" and metrics["core_tasks"] == 3
    assert "hellaswag" in metrics["core_missing"] and len(metrics["core_missing"]) == 19
    # the core_evalset stage named the same tasks unavailable (labels, not file stems: hellaswag_zeroshot, jeopardy)
    assert json.loads((evalset.parent / "evalset_metrics.json").read_text())["unavailable"] == metrics["core_missing"]
    core = json.loads((tmp_path / "out/core.json").read_text())
    rows = core["tasks"]
    assert rows["copa"]["n"] == 20 and rows["winograd"]["type"] == "schema" and rows["lambada_openai"]["baseline"] == 0
    assert rows["squad"] == {"task": "squad", "status": core_eval.NOT_RUN}
    mean = sum(rows[t]["centered"] for t in ("copa", "winograd", "lambada_openai")) / 3
    assert metrics["score"] == pytest.approx(mean)
    bpb = json.loads((tmp_path / "out/bpb.json").read_text())
    assert 0 < bpb["train_bpb"] < 20 and 0 < bpb["val_bpb"] < 20 and bpb["tokens"] == 1024
    report = (tmp_path / "out/report.md").read_text()
    assert "CORE-3 (partial)" in report and "| squad | | | | not run: data unavailable" in report
    assert "**CORE:" not in report  # a partial suite is never named CORE
    table = json.loads((tmp_path / "out/core_table.json").read_text())
    assert len(table) == 22 and {r["task"] for r in table if r["status"] == "ok"} == {"copa", "winograd", "lambada_openai"}
    assert len(json.loads((tmp_path / "out/samples.json").read_text())) > 0
    rows = json.loads((tmp_path / "out/evals.json").read_text())
    assert {r["task"] for r in rows if r["metric"] == "centered" and r["status"] == "ok"} == {"copa", "winograd", "lambada_openai"}
    assert [r["value"] for r in rows if r["metric"] == "mean_centered"] == [pytest.approx(metrics["score"])]
    assert [r["value"] for r in rows if r["suite"] == "bpb"] == [bpb["train_bpb"], bpb["val_bpb"]]


def test_two_ranks_give_the_one_process_result(tiny_checkpoint, evalset, tmp_path):
    one = run(tiny_checkpoint, evalset, tmp_path / "one", max_per_task=15)
    two = run(tiny_checkpoint, evalset, tmp_path / "two", nproc=2, max_per_task=15)
    assert two["world_size"] == 2
    a = json.loads((tmp_path / "one/core.json").read_text())["tasks"]
    b = json.loads((tmp_path / "two/core.json").read_text())["tasks"]
    for label in ("copa", "winograd", "lambada_openai"):
        assert a[label]["correct"] == b[label]["correct"] and a[label]["n"] == b[label]["n"] == 15
    assert one["score"] == pytest.approx(two["score"])
    assert one["val_bpb"] == pytest.approx(two["val_bpb"], rel=1e-4)


def test_evaluate_task_split_over_ranks_sums_to_the_whole():
    items = [{"query": f"q{i}", "choices": ["a", "b", "c"], "gold": i % 3} for i in range(40)]

    class Tok:  # one token per character: enough for prompt building
        bos_id = 0

        def encode_batch(self, texts):
            return [[1 + ord(c) % 200 for c in t] for t in texts]

    scorer = core_eval.UniformScorer(seed=3)
    whole = core_eval.evaluate_task(None, Tok(), items, "arc_easy", max_items=25, scorer=scorer)
    parts = [core_eval.evaluate_task(None, Tok(), items, "arc_easy", max_items=25, scorer=core_eval.OracleScorer(),
                                     rank=r, world_size=3)["correct"] for r in range(3)]
    assert sum(parts) == 25 and whole["n"] == 25
    summed = core_eval.evaluate_task(None, Tok(), items, "arc_easy", max_items=25, scorer=core_eval.OracleScorer(),
                                     rank=1, world_size=3, reduce=lambda v: [sum(parts)])
    assert summed["correct"] == 25 and summed["accuracy"] == 1.0


def test_bad_config_is_a_one_line_error(tiny_checkpoint, evalset, tmp_path):
    from model.errors import InputError

    spec = {"config": {"max_per_task": 0}, "checkpoint_dir": str(tiny_checkpoint), "dataset_dir": str(tiny_checkpoint.parent / "data"),
            "evalset_dir": str(evalset), "out_dir": str(tmp_path / "out")}
    with pytest.raises(InputError, match=r"bad value for base_eval.max_per_task"):
        launch("model.evals.base_eval", spec, tmp_path / "launch", log=lambda m: None)
    assert not (tmp_path / "out").exists()
