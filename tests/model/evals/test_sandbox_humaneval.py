"""All 164 canonical HumanEval solutions pass in the sandbox, built exactly as the chat eval builds programs
(model.evals.chat_tasks.humaneval_program), and a broken one fails: the boundary costs no correct answer."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from helpers import shared_data
from model.evals.chat_tasks import humaneval_program
from model.evals.sandbox import run_program


def humaneval_items() -> list[dict]:
    path = shared_data() / "eval" / "humaneval.jsonl"  # skips, naming the path, where ../shared is absent
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_every_canonical_solution_passes():
    items = humaneval_items()
    assert len(items) == 164
    programs = [humaneval_program(item, item["canonical_solution"]) for item in items]
    # each run waits on its own sandbox; 4 at a time keeps 2 cores busy through the interpreters' start-up.
    # The timeout is generous because the machine running the tests may be shared: this checks correctness.
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda p: run_program(p, timeout=30), programs))
    failed = {item["task_id"]: (o.status, o.detail) for item, o in zip(items, outcomes) if not o.passed}
    assert failed == {}


def test_a_broken_canonical_solution_fails():
    item = humaneval_items()[0]
    out = run_program(humaneval_program(item, item["canonical_solution"].replace("<", ">=")), timeout=30)
    assert (out.passed, out.status) == (False, "failed") and "AssertionError" in out.detail
