"""CORE batched across items scores every item exactly as item by item: bitwise-equal losses and greedy
matches, equal outcomes, and the same outcomes as the one-item-per-pass scorer it replaced (dd83e28)."""
from __future__ import annotations

import pytest
import torch

from helpers import opinionated_gpt, shared_data
from model.evals import core_eval as ce
from model.evals import core_tasks as ct
from model.nn.gpt import GPT

VOCAB = 300
BOS = 256


class ByteTok:
    """One token per UTF-8 byte, BOS = 256: real CORE prompts, fast."""
    bos_id = BOS

    def encode(self, text):
        return list(text.encode())

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def tiny_gpt(seq: int, seed: int = 0) -> GPT:
    return opinionated_gpt(VOCAB, seq, n_head=2, n_embd=32, std=0.5, seed=seed)


class LegacyScorer:
    """The scorer before batching across items (commit dd83e28): one item per pass, padded to its longest
    sequence, cross-entropy over every position."""

    def __init__(self, model):
        self.model = model

    def _forward(self, seqs):
        T = max(len(s.tokens) for s in seqs)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        targets = torch.full((len(seqs), T), -1, dtype=torch.long)
        for b, s in enumerate(seqs):
            toks = torch.tensor(s.tokens)
            ids[b, : len(toks)] = toks
            targets[b, s.start - 1: len(toks) - 1] = toks[s.start:]
        with torch.no_grad():
            return self.model(ids), targets

    def mean_losses(self, query):
        logits, targets = self._forward(query.seqs)
        B, T, V = logits.shape
        loss = torch.nn.functional.cross_entropy(logits.reshape(B * T, V), targets.reshape(-1), ignore_index=-1,
                                                 reduction="none").view(B, T)
        return (loss.sum(1) / (targets >= 0).sum(1)).tolist()

    def greedy_match(self, query):
        logits, targets = self._forward(query.seqs[:1])
        mask = targets >= 0
        return bool((logits.argmax(-1)[mask] == targets[mask]).all())


def real_queries(seq: int, per_task: int = 12) -> list[ce.Query]:
    """Queries of real CORE items, every task type, lengths on both sides of several width steps, some cropped."""
    core = shared_data() / "eval" / "core"
    out = []
    for label in ("copa", "arc_easy", "piqa", "winograd", "winogrande", "lambada_openai", "bigbench_operators",
                  "jeopardy", "commonsense_qa"):
        task = ct.TASKS_BY_LABEL[label]
        items = ct.load_items(core / f"{task.dataset}.jsonl")
        chosen = [items[i] for i in ct.core_order(len(items), per_task)]
        out += [ce.build_query(ByteTok(), task, chosen, i, seq) for i in range(len(chosen))]
    return out


@pytest.fixture(scope="module")
def setup():
    seq = 320  # not a multiple of the width step: the last width is the context itself
    return tiny_gpt(seq), real_queries(seq)


def test_batches_share_a_width_respect_the_budget_and_cover_every_item_once(setup):
    _, queries = setup
    widths = {ce.padded_width(q, 320) for q in queries}
    assert len(widths) >= 4 and 320 in widths  # several widths, and cropped items at the context
    for budget in (1, 700, 4000, 10**6):
        groups = ce.batches(queries, 320, budget)
        assert sorted(i for g in groups for i in g) == list(range(len(queries)))
        for g in groups:
            assert len({ce.padded_width(queries[i], 320) for i in g}) == 1
            rows = sum(1 if queries[i].kind == ct.LM else len(queries[i].seqs) for i in g)
            assert len(g) == 1 or rows * ce.padded_width(queries[g[0]], 320) <= budget
    assert max(len(g) for g in ce.batches(queries, 320, 10**6)) > 10  # items really share passes


def test_batched_losses_and_matches_are_bitwise_those_of_each_item_alone(setup):
    model, queries = setup
    scorer = ce.ModelScorer(model)
    alone = [scorer.results([q])[0] for q in queries]
    for budget in (700, 4000, 10**6):
        together: list = [None] * len(queries)
        for group in ce.batches(queries, 320, budget):
            for i, r in zip(group, scorer.results([queries[i] for i in group])):
                together[i] = r
        assert together == alone  # floats compared with ==: bit for bit
    lm = [r for q, r in zip(queries, alone) if q.kind == ct.LM]
    assert lm and all(isinstance(r, bool) for r in lm)


def test_outcomes_equal_item_by_item_and_the_scorer_before_batching(setup):
    model, queries = setup
    scorer = ce.ModelScorer(model)
    batched = ce.score_items(scorer, queries, 320, batch_tokens=10**6)
    assert batched == ce.score_items(scorer, queries, 320, batch_tokens=1)
    legacy = LegacyScorer(model)
    assert batched == [ce.score_item(legacy, q) for q in queries]
    assert 0 < sum(batched) < len(batched)  # the tiny model gets some right and some wrong
    for q in queries:  # the numbers themselves differ from the old pass only by float rounding
        if q.kind != ct.LM:
            assert scorer.mean_losses(q) == pytest.approx(legacy.mean_losses(q), rel=1e-5)


def test_evaluate_task_rows_do_not_depend_on_the_batch_budget_or_progress_counts_every_item():
    core = shared_data() / "eval" / "core"
    model = tiny_gpt(256, seed=3)
    for label in ("arc_easy", "winogrande", "lambada_openai"):
        task = ct.TASKS_BY_LABEL[label]
        items = ct.load_items(core / f"{task.dataset}.jsonl")
        seen: list[int] = []
        rows = [ce.evaluate_task(model, ByteTok(), items, task, max_items=10, batch_tokens=b, progress=seen.append)
                for b in (1, 2048, 10**6)]
        assert rows[0] == rows[1] == rows[2]
        assert sum(seen) == 30 and len(seen) > 3


def test_test_doubles_without_results_are_still_asked_item_by_item():
    items = [{"query": "Pick", "choices": ["bad", "good"], "gold": 1} for _ in range(5)]
    calls: list[int] = []

    class Counting(ce.OracleScorer):
        def mean_losses(self, query):
            calls.append(1)
            return super().mean_losses(query)

    row = ce.evaluate_task(None, ByteTok(), items, "copa", scorer=Counting())
    assert row["correct"] == 5 and len(calls) == 5
