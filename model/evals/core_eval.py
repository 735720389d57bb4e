"""CORE: the DCLM in-context-learning suite (22 tasks), scored as centered accuracy, exactly as nanochat scores it.

Three task types, all scored from the model's next-token distribution (no generation):

- multiple choice (``mc``, items ``{"query", "choices", "gold"}``): one prompt per choice; the prediction is
  the choice with the lowest mean cross-entropy over its scored tokens.
- schema (``schema``, items ``{"context_options", "continuation", "gold"}``): one prompt per context option,
  all ending in the same continuation; the lowest mean loss on the scored tokens wins.
- language modeling (``lm``, items ``{"context", "continuation"}``): correct only when the greedy argmax at
  every scored position reproduces the scored tokens.

Items. A task's items are shuffled with ``random.Random(1337)`` and cut to the per-task cap (when one is
set); that list is what is evaluated, and position ``i`` in it is the item's identity from then on.

Prompts. Item ``i``'s few-shot examples are drawn with ``random.Random(1234 + i).sample`` from the other
items of that list. A prompt is the examples, each rendered with its gold answer and followed by a blank
line (``"\n\n"``), then the item:

- mc: ``query + delim + choices[gold]`` per example; ``query + delim + choice`` per choice;
- schema: ``context_options[gold] + delim + continuation`` per example; ``option + delim + continuation``
  per option;
- lm: ``context.strip() + delim + continuation`` per example; the item gives two prompts, without the
  continuation (``… + context.strip() + delim``, then stripped of surrounding whitespace, so a trailing
  delimiter space is gone) and with it (``… + context.strip() + delim + continuation``).

Scored spans. Every prompt is tokenized whole, with BOS in front. mc: the tokens after the prefix that all
choices' token sequences share (a first word the choices have in common is not scored); schema: the
tokens of the suffix that all options' sequences share; lm: the tokens of the prompt with the
continuation after the length of the prompt without it (so the delimiter's space, merged with the answer's
first word, is scored). An lm pair whose "without" tokens are not a prefix of its "with" tokens (where
nanochat would stop on an assertion) is scored after their common prefix.

Cropping. A sequence longer than the model's ``sequence_len`` keeps its last ``sequence_len`` tokens (the
oldest few-shot text goes, BOS with it) and its span shifts down by as many, as nanochat crops a model with
a maximum length; should the span's start fall off the front, its surviving tail is scored. nanochat's own
GPT has a rotary table 10× its training length and is never cropped; ours refuses positions past
``sequence_len``, so at the 2,048-token presets only the rare longer prompts differ.

Scorers. The task logic asks a `Scorer` for per-sequence mean losses (mc, schema) or a greedy-match
boolean (lm). `ModelScorer` implements that with a `model.nn.gpt.GPT`; tests plug in test doubles (an
oracle that always prefers gold, a uniform guesser). Queries carry ``gold`` only so that such doubles can
exist; `ModelScorer` never reads it.

Batching. `ModelScorer.results` scores several items in one right-padded causal forward pass, so a real
token never sees padding. Each item's numbers must not depend on its batch: on CPU, torch's attention
rounds differently at different padded widths (~1e-6), though not at different batch sizes. So an item's
rows are padded to its own width, `padded_width` (its longest sequence rounded up to `WIDTH_STEP` tokens,
at most the context), and only items of equal width share a forward pass; `evaluate_task` fills each pass
up to `batch_tokens` rows × width (by default several items per pass on CUDA, one on CPU, where a small
model is compute-bound already). Item by item or batched, an item's losses are then bitwise the same
(tests/model/evals/test_core_batching.py); its mean loss is the sum over its padded row, divided by its
count of scored tokens, as nanochat computes it.

Baselines. Centered accuracy is ``(acc - b) / (1 - b)`` with ``b`` DCLM's published random baseline for
the 22 tasks (a bundle's eval_meta_data.csv wins when present), derived from the items (100/choices,
50 for schema, 0 for lm) for any other task.

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
    DCLM_BASELINES, EXAMPLE_DELIMITER, FEWSHOT_SEED, LM, MC, NOT_RUN, SCHEMA, SHUFFLE_SEED, TASKS, TASKS_BY_LABEL,
    Task, aggregate_name, core_order, derived_baseline, find_task_file, load_items, suite_result,
)


# ---------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Seq:
    """A token sequence whose scored tokens are ``tokens[start:]`` (start ≥ 1: the first token is never scored)."""
    tokens: tuple[int, ...]
    start: int


@dataclass(frozen=True)
class Query:
    """What one item asks of a scorer: mc/schema: several sequences, lowest mean loss wins; lm: one sequence."""
    kind: str
    seqs: tuple[Seq, ...]
    gold: int  # index of the correct sequence (0 for lm); for test doubles only


def fewshot_indices(n_items: int, index: int, shots: int) -> list[int]:
    """Positions of item `index`'s few-shot examples in the evaluated list: seeded per position, never itself."""
    shots = min(shots, n_items - 1)
    if shots <= 0:
        return []
    pool = [i for i in range(n_items) if i != index]
    return random.Random(FEWSHOT_SEED + index).sample(pool, shots)


def _example(task: Task, ex: dict) -> str:
    d = task.delimiter
    if task.kind == MC:
        return ex["query"] + d + ex["choices"][ex["gold"]]
    if task.kind == SCHEMA:
        return ex["context_options"][ex["gold"]] + d + ex["continuation"]
    return ex["context"].strip() + d + ex["continuation"]


def prompts(task: Task, items: Sequence[dict], index: int) -> tuple[list[str], int]:
    """The full prompt texts of item `index` (mc: one per choice; schema: one per option; lm: without and
    with the continuation) and the gold index."""
    item, d = items[index], task.delimiter
    shots = "".join(_example(task, items[j]) + EXAMPLE_DELIMITER for j in fewshot_indices(len(items), index, task.shots))
    if task.kind == MC:
        return [shots + item["query"] + d + c for c in item["choices"]], int(item["gold"])
    if task.kind == SCHEMA:
        return [shots + opt + d + item["continuation"] for opt in item["context_options"]], int(item["gold"])
    head = shots + item["context"].strip() + d
    return [head.strip(), head + item["continuation"]], 0


def common_length(seqs: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """Length of the prefix (or, `from_end`, the suffix) that every sequence shares."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        k = -1 - i if from_end else i
        if any(s[k] != seqs[0][k] for s in seqs):
            return i
    return n


def spans(kind: str, token_seqs: Sequence[Sequence[int]]) -> list[Seq]:
    """The scored span of each tokenized prompt (BOS included), by task kind; see the module docstring."""
    if kind == MC:
        start = common_length(token_seqs)
        return [Seq(tuple(t), start) for t in token_seqs]
    if kind == SCHEMA:
        suffix = common_length(token_seqs, from_end=True)
        return [Seq(tuple(t), len(t) - suffix) for t in token_seqs]
    without, with_ = token_seqs
    start = len(without) if list(with_[: len(without)]) == list(without) else common_length([without, with_])
    return [Seq(tuple(with_), start)]


def crop(seq: Seq, max_len: int) -> Seq:
    """Keep the last `max_len` tokens and shift the span with them (nanochat's crop); at least one token is
    left before the span, so a span longer than the window keeps its tail."""
    over = len(seq.tokens) - max_len
    if over <= 0:
        return seq
    if max_len < 2:
        raise ValueError(f"sequence_len {max_len} leaves no room for a context token and a scored token")
    return Seq(seq.tokens[over:], max(1, seq.start - over))


def build_query(tok, task: Task, items: Sequence[dict], index: int, max_len: int) -> Query:
    """Tokenize item `index`'s prompts (BOS first), find each scored span, crop each to `max_len`."""
    texts, gold = prompts(task, items, index)
    bos = tok.bos_id
    seqs = spans(task.kind, [[bos] + ids for ids in tok.encode_batch(texts)])
    return Query(task.kind, tuple(crop(s, max_len) for s in seqs), gold)


# ---------------------------------------------------------------- scorers

class Scorer(Protocol):
    def mean_losses(self, query: Query) -> list[float]:
        """Mean cross-entropy over each sequence's continuation tokens."""

    def greedy_match(self, query: Query) -> bool:
        """Whether greedy decoding reproduces the (single) sequence's continuation exactly."""


Result = list[float] | bool  # what a scorer answers for one query: mean losses (mc, schema) or a greedy match (lm)

WIDTH_STEP = 64  # padded widths are multiples of this: few distinct widths, so full batches, little padding
BATCH_TOKENS = 8192  # rows × width per forward pass on CUDA by default (logits: that many × vocab floats)
# On CPU a tiny model is compute-bound already at one item per pass (measured: no gain from bigger passes,
# a loss from cache misses), so there the default is one item per pass.
CPU_BATCH_TOKENS = 1


def own_width(length: int, cap: int) -> int:
    """The width a sequence of `length` tokens is padded to, whatever its batch: `length` rounded up to
    `WIDTH_STEP`, at most max(cap, length). torch's CPU attention rounds differently at different padded widths,
    so a width that depends on the item alone keeps its numbers bitwise the same in any batch."""
    return min(-(-length // WIDTH_STEP) * WIDTH_STEP, max(cap, length))


def padded_width(query: Query, max_len: int) -> int:
    """The width an item's rows are padded to: `own_width` of its longest sequence."""
    return own_width(max(len(s.tokens) for s in query.seqs), max_len)


class ModelScorer:
    """Scores with a GPT: the sequences of one or more equal-width queries in one right-padded forward pass."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.model, self.device = model, torch.device(device)
        self.max_len = _sequence_len(model)

    @torch.no_grad()
    def results(self, queries: Sequence[Query]) -> list[Result]:
        """Per query, its mean losses (mc, schema) or greedy match (lm); the queries must share `padded_width`."""
        widths = {padded_width(q, self.max_len) for q in queries}
        if len(widths) != 1:
            raise ValueError(f"queries of one forward pass must share a padded width (got {sorted(widths)})")
        seqs = [s for q in queries for s in (q.seqs[:1] if q.kind == LM else q.seqs)]
        W = widths.pop()
        ids = torch.zeros((len(seqs), W), dtype=torch.long)
        targets = torch.full((len(seqs), W), -1, dtype=torch.long)
        for b, s in enumerate(seqs):
            toks = torch.tensor(s.tokens, dtype=torch.long)
            ids[b, : len(toks)] = toks
            # position p predicts token p + 1: the continuation tokens[start:] are predicted at start-1 .. L-2
            targets[b, s.start - 1: len(toks) - 1] = toks[s.start:]
        ids, targets = ids.to(self.device), targets.to(self.device)
        logits = self.model(ids)
        mask = targets >= 0
        # only scored positions need the softmax; per-row sums run over the whole padded row (zeros elsewhere),
        # as the loss of one item alone was always computed
        picked = logits[mask].float()
        loss = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
        loss[mask] = torch.nn.functional.cross_entropy(picked, targets[mask], reduction="none")
        means = (loss.sum(1) / mask.sum(1)).tolist()
        hits = torch.zeros(mask.shape, dtype=torch.bool, device=logits.device)
        hits[mask] = picked.argmax(-1) == targets[mask]
        matched = (hits | ~mask).all(1).tolist()
        out: list[Result] = []
        row = 0
        for q in queries:
            if q.kind == LM:
                out.append(bool(matched[row]))
                row += 1
            else:
                out.append(means[row: row + len(q.seqs)])
                row += len(q.seqs)
        return out

    def mean_losses(self, query: Query) -> list[float]:
        return self.results([query])[0]

    def greedy_match(self, query: Query) -> bool:
        return self.results([query])[0]


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


def is_correct(query: Query, result: Result) -> bool:
    if query.kind == LM:
        return bool(result)
    return min(range(len(result)), key=result.__getitem__) == query.gold


def score_item(scorer: Scorer, query: Query) -> bool:
    return is_correct(query, scorer.greedy_match(query) if query.kind == LM else scorer.mean_losses(query))


def batches(queries: Sequence[Query], max_len: int, batch_tokens: int) -> list[list[int]]:
    """Indices of `queries` grouped into forward passes: equal padded widths, at most `batch_tokens` rows ×
    width each (a bigger item goes alone), in order of width then position."""
    width = [padded_width(q, max_len) for q in queries]
    rows = [1 if q.kind == LM else len(q.seqs) for q in queries]
    out: list[list[int]] = []
    used = 0
    for i in sorted(range(len(queries)), key=lambda i: (width[i], i)):
        if out and width[out[-1][-1]] == width[i] and used + rows[i] * width[i] <= batch_tokens:
            out[-1].append(i)
            used += rows[i] * width[i]
        else:
            out.append([i])
            used = rows[i] * width[i]
    return out


def score_items(scorer: Scorer, queries: Sequence[Query], max_len: int, batch_tokens: int = BATCH_TOKENS,
                progress=None) -> list[bool]:
    """Whether each query is answered correctly; a scorer with `results` gets several items per call."""
    if not hasattr(scorer, "results"):
        out = []
        for q in queries:
            out.append(score_item(scorer, q))
            if progress is not None:
                progress(1)
        return out
    out = [False] * len(queries)
    for group in batches(queries, max_len, batch_tokens):
        for i, result in zip(group, scorer.results([queries[i] for i in group])):
            out[i] = is_correct(queries[i], result)
        if progress is not None:
            progress(len(group))
    return out


def evaluate_task(model, tok, items: Sequence[dict], task: Task | str, device="cpu", max_items: int | None = None,
                  shuffle_seed: int = SHUFFLE_SEED, *, scorer: Scorer | None = None,
                  baseline: float | None = None, rank: int = 0, world_size: int = 1,
                  reduce: Callable[[list[float]], list[float]] | None = None, progress=None,
                  batch_tokens: int | None = None) -> dict:
    """Accuracy and centered accuracy of one task.

    The items are shuffled with ``random.Random(shuffle_seed)`` and cut to `max_items` (None: all); few-shot
    examples come from that list. `scorer`: defaults to a `ModelScorer` of `model` (`model` may then be
    None). `baseline`: random baseline in percent; defaults to DCLM's for the 22 CORE tasks, else derived
    from the items. Several processes: rank r scores positions r, r+W, … and `reduce` (a sum over ranks)
    combines the counts, so every rank returns the single-process result. `progress`: called with the
    number of items scored, as they are. `batch_tokens`: rows × width per forward pass of a `ModelScorer`
    (see Batching in the module doc; the result does not depend on it); None: `BATCH_TOKENS` on CUDA,
    one item per pass on CPU.
    """
    task = TASKS_BY_LABEL[task] if isinstance(task, str) else task
    if not items:
        raise ValueError(f"{task.label}: no items to evaluate")
    chosen = [items[i] for i in core_order(len(items), max_items, shuffle_seed)]
    scorer = scorer if scorer is not None else ModelScorer(model, device)
    max_len = _sequence_len(model)
    if model is not None and hasattr(model, "eval"):
        model.eval()
    queries = [build_query(tok, task, chosen, pos, max_len) for pos in range(rank, len(chosen), world_size)]
    if batch_tokens is None:
        batch_tokens = BATCH_TOKENS if torch.device(device).type == "cuda" else CPU_BATCH_TOKENS
    correct = sum(score_items(scorer, queries, max_len, batch_tokens, progress))
    if reduce is not None:
        correct = int(round(reduce([float(correct)])[0]))
    if baseline is not None:
        source = "given"
    elif task.label in DCLM_BASELINES:
        baseline, source = DCLM_BASELINES[task.label], "DCLM"
    else:
        baseline, source = derived_baseline(task, items), "derived from data"
    acc = correct / len(chosen)
    return {"task": task.label, "status": "ok", "type": task.kind, "shots": task.shots, "n": len(chosen),
            "correct": correct, "accuracy": acc, "baseline": baseline, "baseline_source": source,
            "centered": centered(acc, baseline)}


def evaluate_core(model, tok, data_dir: str | Path, device="cpu", max_per_task: int | None = None,
                  baselines: dict[str, float] | None = None, *, scorer: Scorer | None = None,
                  tasks: Sequence[Task] = TASKS, rank: int = 0, world_size: int = 1,
                  reduce: Callable[[list[float]], list[float]] | None = None, progress=None,
                  batch_tokens: int | None = None) -> dict:
    """Run every CORE task whose data file exists in `data_dir`.

    Returns ``{"tasks": {label: row}, "aggregate": {"name", "value", "tasks", "missing"}, <name>: value}``;
    a missing task's row is ``{"status": "not run: data unavailable"}``; the aggregate is named ``"CORE"``
    only when all 22 tasks ran, else ``"CORE-<k> (partial)"``. `baselines` ({label: percent}, e.g. from
    `load_baselines`) override the default baselines (DCLM's, or derived from the data); `tasks`: e.g. a bundle's core.yaml
    (`load_task_list`). `rank`, `world_size`, `reduce`, `progress`, `batch_tokens`: as in `evaluate_task`, for every task.
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
                                         progress=progress, batch_tokens=batch_tokens)
        rows[task.label].update(file=str(path), seconds=round(time.perf_counter() - t0, 3))
    return suite_result(rows, aggregate_name)
