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
boolean (lm). `ModelScorer` implements that with a `model.nn.gpt.GPT` (all choices of one item in one
padded forward pass); tests plug in test doubles (an oracle that always prefers gold, a uniform guesser).
Queries carry ``gold`` only so that such doubles can exist; `ModelScorer` never reads it.

Aggregate. The mean centered accuracy over the tasks that ran is called ``"CORE"`` only when all 22 ran,
otherwise ``"CORE-<k> (partial)"`` with the list of tasks it covers.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from model.evals.core_tasks import (
    EXAMPLE_DELIMITER, FEWSHOT_SEED, LM, MC, NOT_RUN, SCHEMA, SHUFFLE_SEED, TASKS, TASKS_BY_LABEL, Task, aggregate_name,
    derived_baseline, find_task_file, load_items, select, suite_result,
)


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
    n = len(items) if max_items is None else min(max_items, len(items))
    if model is not None and hasattr(model, "eval"):
        model.eval()
    correct = 0
    for i in select(len(items), max_items, rank, world_size, shuffle_seed):
        correct += score_item(scorer, build_query(tok, task, items, i, max_len))
        if progress is not None:
            progress(1)
    if reduce is not None:
        correct = int(round(reduce([float(correct)])[0]))
    source = "given"
    if baseline is None:
        baseline, source = derived_baseline(task, items), "derived from data"
    acc = correct / n
    return {"task": task.label, "status": "ok", "type": task.kind, "shots": task.shots, "n": n,
            "correct": correct, "accuracy": acc, "baseline": baseline, "baseline_source": source,
            "centered": centered(acc, baseline)}


def evaluate_core(model, tok, data_dir: str | Path, device="cpu", max_per_task: int | None = None,
                  baselines: dict[str, float] | None = None, *, scorer: Scorer | None = None,
                  tasks: Sequence[Task] = TASKS, rank: int = 0, world_size: int = 1,
                  reduce: Callable[[list[float]], list[float]] | None = None, progress=None) -> dict:
    """Run every CORE task whose data file exists in `data_dir`.

    Returns ``{"tasks": {label: row}, "aggregate": {"name", "value", "tasks", "missing"}, <name>: value}``;
    a missing task's row is ``{"status": "not run: data unavailable"}``; the aggregate is named ``"CORE"``
    only when all 22 tasks ran, else ``"CORE-<k> (partial)"``. `baselines` ({label: percent}, e.g. from
    `load_baselines`) override the baselines derived from the data; `tasks`: e.g. a bundle's core.yaml
    (`load_task_list`). `rank`, `world_size`, `reduce`, `progress`: as in `evaluate_task`, for every task.
    """
    scorer = scorer if scorer is not None else ModelScorer(model, device)
    rows: dict[str, dict] = {}
    for task in tasks:
        path = find_task_file(Path(data_dir), task)
        if path is None:
            rows[task.label] = {"task": task.label, "status": NOT_RUN}
            continue
        given = (baselines or {}).get(task.label)
        t0 = time.perf_counter()
        rows[task.label] = evaluate_task(model, tok, load_items(path), task, device, max_per_task, scorer=scorer,
                                         baseline=given, rank=rank, world_size=world_size, reduce=reduce,
                                         progress=progress)
        rows[task.label].update(file=str(path), seconds=round(time.perf_counter() - t0, 3))
    return suite_result(rows, aggregate_name)
