"""The CORE suite as data: its 22 tasks, their files and baselines, and how a suite's result is summed up.

No torch here, so that planning a run (which hashes eval directories) and reading results stay light;
the scoring itself is `model.evals.core_eval`. `suite_result` and `eval_rows` serve ChatCORE too.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

FEWSHOT_SEED = 1234
SHUFFLE_SEED = 1337
EXAMPLE_DELIMITER = "\n\n"  # after each few-shot example: a blank line, as nanochat renders them
NOT_RUN = "not run: data unavailable"

MC, SCHEMA, LM = "mc", "schema", "lm"


@dataclass(frozen=True)
class Task:
    label: str  # the name CORE reports (DCLM's "Eval Task")
    dataset: str  # file stem of the data: <data_dir>/<dataset>.jsonl
    kind: str  # MC, SCHEMA or LM
    shots: int  # number of few-shot examples
    delimiter: str = " "  # continuation delimiter, between context and continuation


# The 22 CORE tasks, in DCLM's order.
# Sources:
# - label, task type and #shots: DCLM `eval/eval_meta_data_v1.csv` (github.com/mlfoundations/dclm, commit
#   361714bd), columns "Eval Task", "Task Type", "#shots"; every value below matches that file.
# - dataset file stems: llm-foundry `scripts/eval/local_data` (the names the DCLM bundle uses; winograd's
#   file is winograd_wsc, jeopardy's is jeopardy_all), as in /work/shared/data/README.md.
# - delimiters: llm-foundry's ICL task configs use "\nAnswer: " for jeopardy (e.g. its gauntlet callback
#   test config) and the default " " for every other task.
TASKS: tuple[Task, ...] = (
    Task("hellaswag_zeroshot", "hellaswag", MC, 0),
    Task("jeopardy", "jeopardy_all", LM, 10, "\nAnswer: "),
    Task("bigbench_qa_wikidata", "bigbench_qa_wikidata", LM, 10),
    Task("arc_easy", "arc_easy", MC, 10),
    Task("arc_challenge", "arc_challenge", MC, 10),
    Task("copa", "copa", MC, 0),
    Task("commonsense_qa", "commonsense_qa", MC, 10),
    Task("piqa", "piqa", MC, 10),
    Task("openbook_qa", "openbook_qa", MC, 0),
    Task("lambada_openai", "lambada_openai", LM, 0),
    Task("hellaswag", "hellaswag", MC, 10),
    Task("winograd", "winograd_wsc", SCHEMA, 0),
    Task("winogrande", "winogrande", SCHEMA, 0),
    Task("bigbench_dyck_languages", "bigbench_dyck_languages", LM, 10),
    Task("agi_eval_lsat_ar", "agi_eval_lsat_ar", MC, 3),
    Task("bigbench_cs_algorithms", "bigbench_cs_algorithms", LM, 10),
    Task("bigbench_operators", "bigbench_operators", LM, 10),
    Task("bigbench_repeat_copy_logic", "bigbench_repeat_copy_logic", LM, 10),
    Task("squad", "squad", LM, 10),
    Task("coqa", "coqa", LM, 0),
    Task("boolq", "boolq", MC, 10),
    Task("bigbench_language_identification", "bigbench_language_identification", MC, 10),
)
TASKS_BY_LABEL = {t.label: t for t in TASKS}

# DCLM's published "Random baseline" (percent) for the 22 tasks, from the same eval_meta_data_v1.csv: the
# default, as in nanochat, which always centers with these (a bundle's own eval_meta_data.csv wins). Four
# differ from 100/choices of the items as packaged: commonsense_qa 20 (items have 4 choices),
# agi_eval_lsat_ar 20 (4 choices), boolq 62 (the majority class, 2 choices), bigbench_language_identification
# 9.1 (4 choices); so a uniform guesser scores above zero there, in nanochat as here.
DCLM_BASELINES: dict[str, float] = {
    "hellaswag_zeroshot": 25, "jeopardy": 0, "bigbench_qa_wikidata": 0, "arc_easy": 25, "arc_challenge": 25,
    "copa": 50, "commonsense_qa": 20, "piqa": 50, "openbook_qa": 25, "lambada_openai": 0, "hellaswag": 25,
    "winograd": 50, "winogrande": 50, "bigbench_dyck_languages": 0, "agi_eval_lsat_ar": 20,
    "bigbench_cs_algorithms": 0, "bigbench_operators": 0, "bigbench_repeat_copy_logic": 0, "squad": 0,
    "coqa": 0, "boolq": 62, "bigbench_language_identification": 9.1,
}


# ---------------------------------------------------------------- data and baselines

_YAML_KINDS = {"multiple_choice": MC, "schema": SCHEMA, "language_modeling": LM}


def load_task_list(yaml_path: str | Path) -> tuple[Task, ...]:
    """The tasks of a DCLM bundle's core.yaml (`icl_tasks`: label, dataset_uri, num_fewshot, icl_task_type,
    continuation_delimiter), in its order; what the bundle says wins over the built-in TASKS."""
    import yaml

    with open(yaml_path, encoding="utf-8") as f:
        spec = yaml.safe_load(f) or {}
    tasks = []
    for entry in spec.get("icl_tasks", []):
        shots = entry.get("num_fewshot", [0])
        kind = _YAML_KINDS.get(entry.get("icl_task_type", ""))
        if kind is None:
            raise ValueError(f"{yaml_path}: task {entry.get('label')!r} has unknown icl_task_type {entry.get('icl_task_type')!r}")
        tasks.append(Task(entry["label"], Path(entry["dataset_uri"]).stem, kind,
                          int(shots[0] if isinstance(shots, list) else shots), entry.get("continuation_delimiter", " ")))
    if not tasks:
        raise ValueError(f"{yaml_path}: no icl_tasks")
    return tuple(tasks)


def load_items(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def derived_baseline(task: Task, items: Sequence[dict]) -> float:
    """Random-guess accuracy in percent: the mean of 100/choices over the items (mc), 100/options (schema), 0 (lm)."""
    if task.kind == LM or not items:
        return 0.0
    key = "choices" if task.kind == MC else "context_options"
    return 100.0 * sum(1.0 / len(it[key]) for it in items) / len(items)


def load_baselines(csv_path: str | Path) -> dict[str, float]:
    """{task label: random baseline in percent} from DCLM's eval_meta_data.csv ("Eval Task", "Random baseline")."""
    out: dict[str, float] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        label_col = next((cols[c] for c in ("eval task", "label", "task") if c in cols), None)
        base_col = cols.get("random baseline")
        if label_col is None or base_col is None:
            raise ValueError(f"{csv_path}: needs an 'Eval Task' and a 'Random baseline' column (has {reader.fieldnames})")
        for row in reader:
            label, value = (row.get(label_col) or "").strip(), (row.get(base_col) or "").strip()
            if label and value:
                out[label] = float(value)
    return out


def find_task_file(data_dir: Path, task: Task) -> Path | None:
    """<data_dir>/<dataset>.jsonl, or the first such file below data_dir (the DCLM bundle nests them by category)."""
    data_dir = Path(data_dir)
    direct = data_dir / f"{task.dataset}.jsonl"
    if direct.is_file():
        return direct
    return next(iter(sorted(data_dir.rglob(f"{task.dataset}.jsonl"))), None) if data_dir.is_dir() else None


def aggregate_name(covered: Iterable[str]) -> str:
    k = len(set(covered))
    return "CORE" if set(covered) >= set(TASKS_BY_LABEL) else f"CORE-{k} (partial)"


def select(n_items: int, max_items: int | None, rank: int = 0, world_size: int = 1, seed: int = SHUFFLE_SEED) -> list[int]:
    """The item indices rank `rank` of `world_size` evaluates: all items in file order, or with `max_items`
    the first max_items indices after shuffling them with ``random.Random(seed)``; then every W-th from r."""
    order = list(range(n_items))
    if max_items is not None and max_items < n_items:
        random.Random(seed).shuffle(order)
        order = order[:max_items]
    return order[rank::world_size]


def core_order(n_items: int, max_items: int | None, seed: int = SHUFFLE_SEED) -> list[int]:
    """The item indices CORE evaluates, in order: all of them shuffled with ``random.Random(seed)``, then cut to
    `max_items` (nanochat's base_eval); position i of this list seeds item i's few-shot draw."""
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    return order if max_items is None else order[:max_items]


def suite_result(rows: dict[str, dict], name_of: Callable[[Iterable[str]], str]) -> dict:
    """`{"tasks": rows, "aggregate": {"name", "value", "tasks", "missing"}, <name>: value}`: the mean centered
    accuracy over the rows whose status is "ok", named by `name_of` from the tasks it covers."""
    covered = [task for task, r in rows.items() if r["status"] == "ok"]
    name = name_of(covered)
    value = sum(rows[task]["centered"] for task in covered) / len(covered) if covered else None
    agg = {"name": name, "value": value, "tasks": covered, "missing": [task for task, r in rows.items() if r["status"] != "ok"]}
    return {"tasks": rows, "aggregate": agg, name: value}


def eval_rows(result: dict) -> list[dict]:
    """The long-format rows (suite, task, metric, value, n, status) of a suite result shaped like
    `evaluate_core`'s (also ChatCORE's): what an eval artifact's evals.json holds for the DuckDB `evals` table."""
    agg = result["aggregate"]
    rows = []
    for task, r in result["tasks"].items():
        if r["status"] != "ok":
            rows.append({"suite": agg["name"], "task": task, "metric": "centered", "value": None, "n": None, "status": r["status"]})
            continue
        rows += [{"suite": agg["name"], "task": task, "metric": m, "value": r[m], "n": r["n"], "status": "ok"}
                 for m in ("accuracy", "centered")]
    rows.append({"suite": agg["name"], "task": agg["name"], "metric": "mean_centered", "value": agg["value"],
                 "n": len(agg["tasks"]), "status": "ok" if agg["value"] is not None else NOT_RUN})
    return rows
