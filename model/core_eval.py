"""CORE: the DCLM in-context-learning suite (22 tasks), scored as centered accuracy.

Three task types, all scored from the model's next-token distribution (no generation):

- multiple choice (``mc``, items ``{"query", "choices", "gold"}``): one context (few-shot + query +
  delimiter), one continuation per choice; the prediction is the choice with the lowest mean
  cross-entropy over its continuation tokens.
- schema (``schema``, items ``{"context_options", "continuation", "gold"}``): one context per option
  (few-shot + option + delimiter), the same continuation; the lowest mean loss on the continuation wins.
- language modeling (``lm``, items ``{"context", "continuation"}``): correct only when the greedy argmax
  at every continuation position reproduces the continuation tokens.

Prompts. Few-shot examples for item ``i`` are drawn with ``random.Random(1234 + i)`` from the task's
other items (never item ``i`` itself), ``i`` being the item's index in the data file, so a prompt does not
depend on which items a capped run happens to evaluate. A few-shot example is rendered with its gold
answer (mc: query + delimiter + gold choice; schema: gold option + delimiter + continuation; lm: context +
delimiter + continuation) and examples are joined with ``EXAMPLE_DELIMITER`` (llm-foundry's default
example delimiter, a newline). Every sequence starts with BOS. Jeopardy's same-category few-shot
(llm-foundry's ``has_categories``) is not reproduced: shots come from any category.

Token boundaries. The continuation is appended to the context as text (``context + continuation``) and
both strings are tokenized; the continuation tokens are those of the full string after its longest
common prefix with the context's tokens. A delimiter that ends in a space (" ") thus merges with the
first word of the continuation into one " word" token, as it would in running text, and that token counts
as continuation. At least one token is always scored.

Cropping. A sequence longer than the model's ``sequence_len`` keeps its BOS and its last
``sequence_len - 1`` tokens (it loses the oldest few-shot text, never the continuation's end); should the
continuation itself not fit, only its surviving tail is scored.

Scorers. The task logic asks a `Scorer` for per-continuation mean losses (mc, schema) or a greedy-match
boolean (lm). `ModelScorer` implements that with a `model.gpt.GPT` (all choices of one item in one
padded forward pass); tests plug in test doubles (an oracle that always prefers gold, a uniform guesser).
Queries carry ``gold`` only so that such doubles can exist; `ModelScorer` never reads it.

Aggregate. The mean centered accuracy over the tasks that ran is called ``"CORE"`` only when all 22 ran,
otherwise ``"CORE-<k> (partial)"`` with the list of tasks it covers.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import torch

FEWSHOT_SEED = 1234
SHUFFLE_SEED = 1337
EXAMPLE_DELIMITER = "\n"
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

# DCLM's published "Random baseline" (percent) for the 22 tasks, from the same eval_meta_data_v1.csv.
# NOT the default: by default baselines are derived from the data (100 / number of choices, 50 for
# schema, 0 for LM). They differ on four tasks, where DCLM's numbers do not equal 100/choices of the items
# as packaged: commonsense_qa 20 (items have 4 choices), agi_eval_lsat_ar 20 (4 choices), boolq 62
# (the majority class, 2 choices), bigbench_language_identification 9.1 (4 choices). Pass
# `baselines=DCLM_BASELINES` (or `load_baselines(<eval_meta_data.csv>)`) for scores comparable to DCLM/nanochat.
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


# ---------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Seq:
    """A token sequence whose continuation is ``tokens[start:]`` (start ≥ 1: BOS is never scored)."""
    tokens: tuple[int, ...]
    start: int


@dataclass(frozen=True)
class Query:
    """What one item asks of a scorer: mc/schema: several sequences, lowest mean loss wins; lm: one sequence."""
    kind: str
    seqs: tuple[Seq, ...]
    gold: int  # index of the correct sequence (0 for lm); for test doubles only


def fewshot_indices(n_items: int, index: int, shots: int) -> list[int]:
    """Indices of the few-shot examples of item `index`: seeded per item, never the item itself."""
    shots = min(shots, n_items - 1)
    if shots <= 0:
        return []
    pool = [i for i in range(n_items) if i != index]
    return random.Random(FEWSHOT_SEED + index).sample(pool, shots)


def _render_example(task: Task, item: dict) -> str:
    d = task.delimiter
    if task.kind == MC:
        return item["query"] + d + item["choices"][item["gold"]]
    if task.kind == SCHEMA:
        return item["context_options"][item["gold"]] + d + item["continuation"]
    return item["context"] + d + item["continuation"]


def _prefix(task: Task, items: Sequence[dict], index: int) -> str:
    shots = [_render_example(task, items[j]) for j in fewshot_indices(len(items), index, task.shots)]
    return "".join(s + EXAMPLE_DELIMITER for s in shots)


def prompt_texts(task: Task, items: Sequence[dict], index: int) -> tuple[list[tuple[str, str]], int]:
    """The (context, continuation) text pairs of item `index`, one per option, and the gold option."""
    item, prefix, d = items[index], _prefix(task, items, index), task.delimiter
    if task.kind == MC:
        ctx = prefix + item["query"] + d
        return [(ctx, c) for c in item["choices"]], int(item["gold"])
    if task.kind == SCHEMA:
        return [(prefix + opt + d, item["continuation"]) for opt in item["context_options"]], int(item["gold"])
    return [(prefix + item["context"] + d, item["continuation"])], 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def crop_left(tokens: Sequence[int], start: int, max_len: int) -> Seq:
    """Fit `max_len`: keep the first token (BOS) and the last max_len - 1 tokens; shift `start` accordingly."""
    tokens = list(tokens)
    if len(tokens) <= max_len:
        return Seq(tuple(tokens), start)
    if max_len < 2:
        raise ValueError(f"sequence_len {max_len} leaves no room for a context token and a continuation token")
    dropped = len(tokens) - max_len
    return Seq(tuple(tokens[:1] + tokens[-(max_len - 1):]), max(1, start - dropped))


def build_query(tok, task: Task, items: Sequence[dict], index: int, max_len: int) -> Query:
    """Tokenize item `index`'s prompts (BOS first), mark each continuation, crop each to `max_len`."""
    pairs, gold = prompt_texts(task, items, index)
    texts = [t for ctx, cont in pairs for t in (ctx, ctx + cont)]
    encoded = tok.encode_batch(texts)
    bos = tok.bos_id
    seqs = []
    for k in range(len(pairs)):
        ctx_ids, full_ids = [bos] + encoded[2 * k], [bos] + encoded[2 * k + 1]
        start = min(_common_prefix(ctx_ids, full_ids), len(full_ids) - 1)
        seqs.append(crop_left(full_ids, max(start, 1), max_len))
    return Query(task.kind, tuple(seqs), gold)


# ---------------------------------------------------------------- scorers

class Scorer(Protocol):
    def mean_losses(self, query: Query) -> list[float]:
        """Mean cross-entropy over each sequence's continuation tokens."""

    def greedy_match(self, query: Query) -> bool:
        """Whether greedy decoding reproduces the (single) sequence's continuation exactly."""


class ModelScorer:
    """Scores with a GPT: the sequences of one query go through one right-padded forward pass."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.model, self.device = model, torch.device(device)

    def _forward(self, seqs: Sequence[Seq]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, T, V), targets (B, T) with -1 outside continuations, input ids (B, T))."""
        T = max(len(s.tokens) for s in seqs)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        targets = torch.full((len(seqs), T), -1, dtype=torch.long)
        for b, s in enumerate(seqs):
            toks = torch.tensor(s.tokens, dtype=torch.long)
            ids[b, : len(toks)] = toks
            # position p predicts token p + 1: the continuation tokens[start:] are predicted at start-1 .. L-2
            targets[b, s.start - 1: len(toks) - 1] = toks[s.start:]
        ids, targets = ids.to(self.device), targets.to(self.device)
        with torch.no_grad():
            logits = self.model(ids)
        return logits, targets, ids

    def mean_losses(self, query: Query) -> list[float]:
        logits, targets, _ = self._forward(query.seqs)
        B, T, V = logits.shape
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(-1),
                                                 ignore_index=-1, reduction="none").view(B, T)
        mask = targets >= 0
        return (loss.sum(1) / mask.sum(1)).tolist()

    def greedy_match(self, query: Query) -> bool:
        logits, targets, _ = self._forward(query.seqs[:1])
        mask = targets >= 0
        return bool((logits.argmax(-1)[mask] == targets[mask]).all())


class OracleScorer:
    """Test double: always prefers gold, always reproduces the continuation (centered accuracy 1)."""

    def mean_losses(self, query: Query) -> list[float]:
        return [0.0 if i == query.gold else 1.0 for i in range(len(query.seqs))]

    def greedy_match(self, query: Query) -> bool:
        return True


class UniformScorer:
    """Test double: a guesser with no preference (random losses, ties impossible); never completes an LM item."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def mean_losses(self, query: Query) -> list[float]:
        return [self.rng.random() for _ in query.seqs]

    def greedy_match(self, query: Query) -> bool:
        return False


# ---------------------------------------------------------------- evaluation

def centered(accuracy: float, baseline_pct: float) -> float:
    b = baseline_pct / 100.0
    return (accuracy - b) / (1.0 - b)


def _sequence_len(model, default: int = 2048) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "sequence_len", default)) if cfg is not None else default


def score_item(scorer: Scorer, query: Query) -> bool:
    if query.kind == LM:
        return bool(scorer.greedy_match(query))
    losses = scorer.mean_losses(query)
    return min(range(len(losses)), key=losses.__getitem__) == query.gold


def evaluate_task(model, tok, items: Sequence[dict], task: Task | str, device="cpu", max_items: int | None = None,
                  shuffle_seed: int = SHUFFLE_SEED, *, scorer: Scorer | None = None,
                  baseline: float | None = None, rank: int = 0, world_size: int = 1,
                  reduce: Callable[[list[float]], list[float]] | None = None, progress=None) -> dict:
    """Accuracy and centered accuracy of one task.

    `max_items`: evaluate the first `max_items` items after shuffling the indices with
    ``random.Random(shuffle_seed)`` (few-shot examples still come from all items). `scorer`: defaults to a
    `ModelScorer` of `model` (`model` may then be None). `baseline`: random baseline in percent; defaults
    to the one derived from the items. Several processes: rank r scores the selected items r, r+W, …
    and `reduce` (a sum over ranks) combines the counts, so every rank returns the single-process result.
    `progress`: called with the number of items scored, as they are.
    """
    task = TASKS_BY_LABEL[task] if isinstance(task, str) else task
    items = list(items)
    if not items:
        raise ValueError(f"{task.label}: no items to evaluate")
    scorer = scorer if scorer is not None else ModelScorer(model, device)
    max_len = _sequence_len(model)
    order = list(range(len(items)))
    if max_items is not None and max_items < len(items):
        random.Random(shuffle_seed).shuffle(order)
        order = order[:max_items]
    if model is not None and hasattr(model, "eval"):
        model.eval()
    correct = 0
    for i in order[rank::world_size]:
        correct += score_item(scorer, build_query(tok, task, items, i, max_len))
        if progress is not None:
            progress(1)
    if reduce is not None:
        correct = int(round(reduce([float(correct)])[0]))
    source = "given"
    if baseline is None:
        baseline, source = derived_baseline(task, items), "derived from data"
    acc = correct / len(order)
    return {"task": task.label, "status": "ok", "type": task.kind, "shots": task.shots, "n": len(order),
            "correct": correct, "accuracy": acc, "baseline": baseline, "baseline_source": source,
            "centered": centered(acc, baseline)}


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


def evaluate_core(model, tok, data_dir: str | Path, device="cpu", max_per_task: int | None = None,
                  baselines: dict[str, float] | None = None, *, scorer: Scorer | None = None,
                  tasks: Sequence[Task] = TASKS) -> dict:
    """Run every CORE task whose data file exists in `data_dir`.

    Returns ``{"tasks": {label: row}, "aggregate": {"name", "value", "tasks", "missing"}, <name>: value}``;
    a missing task's row is ``{"status": "not run: data unavailable"}``; the aggregate is named ``"CORE"``
    only when all 22 tasks ran, else ``"CORE-<k> (partial)"``. `baselines` ({label: percent}, e.g. from
    `load_baselines`) override the baselines derived from the data.
    """
    scorer = scorer if scorer is not None else ModelScorer(model, device)
    rows: dict[str, dict] = {}
    for task in tasks:
        path = find_task_file(Path(data_dir), task)
        if path is None:
            rows[task.label] = {"task": task.label, "status": NOT_RUN}
            continue
        given = (baselines or {}).get(task.label)
        rows[task.label] = evaluate_task(model, tok, load_items(path), task, device, max_per_task,
                                         scorer=scorer, baseline=given)
        rows[task.label]["file"] = str(path)
    covered = [label for label, r in rows.items() if r["status"] == "ok"]
    name = aggregate_name(covered)
    value = sum(rows[label]["centered"] for label in covered) / len(covered) if covered else None
    agg = {"name": name, "value": value, "tasks": covered,
           "missing": [label for label, r in rows.items() if r["status"] != "ok"]}
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
