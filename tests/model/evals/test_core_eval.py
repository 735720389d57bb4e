"""CORE eval: task table, prompts, token boundaries, cropping, the GPT scorer, oracle/uniform doubles, naming."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers import opinionated_gpt, shared_data, small_bpe
from model.evals import core_eval as ce
from model.evals import core_tasks as ct
from model.nn.gpt import GPT
from model.data.tokenizer import Tokenizer

SHARED_18 = ["jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa", "commonsense_qa", "piqa",
             "openbook_qa", "lambada_openai", "winograd", "winogrande", "bigbench_dyck_languages",
             "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators", "bigbench_repeat_copy_logic",
             "boolq", "bigbench_language_identification"]
MISSING_4 = ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]


TEXT = ("The capital of France is Paris. The capital of Italy is Rome. Question: what is red? Answer: "
        "an apple is red and the sky is blue. yes no maybe the cat sat on the mat. ") * 5


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return small_bpe(TEXT, 330, repeat=10)


class ByteTok:
    """Test double of `Tokenizer` for the big data runs: one token per UTF-8 byte, BOS = 256 (fast)."""
    bos_id = 256

    def encode(self, text):
        return list(text.encode())

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


class Stub:
    """A model stand-in that only carries the config the evaluator reads."""

    def __init__(self, sequence_len=2048):
        self.config = type("C", (), {"sequence_len": sequence_len})()


class KeywordScorer:
    """Test double: a continuation containing "good" has loss 0, others 1; LM items match when the
    continuation text contains "good". Decodes with the byte tokenizer."""

    def _cont(self, seq):
        return bytes(t for t in seq.tokens[seq.start:] if t < 256).decode()

    def mean_losses(self, query):
        return [0.0 if "good" in self._cont(s) else 1.0 for s in query.seqs]

    def greedy_match(self, query):
        return "good" in self._cont(query.seqs[0])


def tiny_gpt(vocab: int, seq: int = 64, seed: int = 0) -> GPT:
    return opinionated_gpt(vocab, seq, n_layer=1, n_head=2, n_embd=32, std=0.5, seed=seed)


# ---------------------------------------------------------------- the task table

def test_task_table_is_the_22_core_tasks():
    labels = [t.label for t in ct.TASKS]
    assert len(labels) == 22 == len(set(labels))
    assert set(labels) == set(SHARED_18) | set(MISSING_4)
    assert set(ct.DCLM_BASELINES) == set(labels)
    t = ct.TASKS_BY_LABEL
    assert (t["jeopardy"].dataset, t["jeopardy"].kind, t["jeopardy"].shots, t["jeopardy"].delimiter) == \
        ("jeopardy_all", ct.LM, 10, "\nAnswer: ")
    assert (t["winograd"].dataset, t["winograd"].kind, t["winograd"].shots) == ("winograd_wsc", ct.SCHEMA, 0)
    assert (t["agi_eval_lsat_ar"].kind, t["agi_eval_lsat_ar"].shots) == (ct.MC, 3)
    assert (t["hellaswag_zeroshot"].dataset, t["hellaswag_zeroshot"].shots) == ("hellaswag", 0)
    assert [t[x].shots for x in ("copa", "openbook_qa", "lambada_openai", "coqa", "winogrande")] == [0] * 5
    assert all(task.delimiter == " " for task in ct.TASKS if task.label != "jeopardy")


def test_baselines_derived_from_data_and_loaded_from_csv(tmp_path):
    mc = ct.TASKS_BY_LABEL["arc_easy"]
    assert ct.derived_baseline(mc, [{"query": "q", "choices": list("abcd"), "gold": 0}] * 3) == 25.0
    assert ct.derived_baseline(mc, [{"query": "q", "choices": list("ab"), "gold": 0},
                                    {"query": "q", "choices": list("abcd"), "gold": 0}]) == pytest.approx(37.5)
    assert ct.derived_baseline(ct.TASKS_BY_LABEL["winogrande"], [{"context_options": ["a", "b"]}]) == 50.0
    assert ct.derived_baseline(ct.TASKS_BY_LABEL["squad"], [{"context": "c", "continuation": "x"}]) == 0.0
    csv_path = tmp_path / "eval_meta_data.csv"
    csv_path.write_text('Eval Task,Task Category,Task Type,#shots,Random baseline,Description\n'
                        'boolq,reading comprehension,multiple choice,10,62,"yes, no"\n'
                        'jeopardy,world knowledge,language modeling,10,0,x\n')
    assert ct.load_baselines(csv_path) == {"boolq": 62.0, "jeopardy": 0.0}


def test_centered_accuracy():
    assert ce.centered(0.25, 25) == 0.0
    assert ce.centered(1.0, 62) == pytest.approx(1.0)
    assert ce.centered(0.5, 0) == 0.5


# ---------------------------------------------------------------- prompts

def test_fewshot_sampling_excludes_the_item_and_is_deterministic():
    for index in range(30):
        shots = ce.fewshot_indices(30, index, 10)
        assert len(shots) == len(set(shots)) == 10 and index not in shots
        assert shots == ce.fewshot_indices(30, index, 10)
        assert shots == random.Random(1234 + index).sample([i for i in range(30) if i != index], 10)
    assert ce.fewshot_indices(30, 0, 10) != ce.fewshot_indices(30, 1, 10)
    assert sorted(ce.fewshot_indices(4, 2, 10)) == [0, 1, 3]  # fewer items than shots: all the others
    assert ce.fewshot_indices(1, 0, 10) == [] and ce.fewshot_indices(30, 5, 0) == []


def test_prompts_join_examples_with_a_blank_line_per_task_type():
    mc_items = [{"query": f"Q{i}?", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(5)]
    texts, gold = ce.prompts(ct.Task("t", "t", ct.MC, 2), mc_items, 3)
    j, k = ce.fewshot_indices(5, 3, 2)
    shots = f"Q{j}? {'ab'[j % 2]}{j}\n\nQ{k}? {'ab'[k % 2]}{k}\n\n"
    assert texts == [shots + "Q3? a3", shots + "Q3? b3"] and gold == 1

    sc_items = [{"context_options": [f"A{i}", f"B{i}"], "continuation": f"end{i}.", "gold": 1} for i in range(3)]
    texts, gold = ce.prompts(ct.Task("s", "s", ct.SCHEMA, 1), sc_items, 0)
    (j,) = ce.fewshot_indices(3, 0, 1)
    assert texts == [f"B{j} end{j}.\n\nA0 end0.", f"B{j} end{j}.\n\nB0 end0."] and gold == 1

    # lm: contexts stripped; the prompt without the continuation loses its trailing delimiter whitespace
    lm_items = [{"context": f"  C{i} \n", "continuation": f"X{i}"} for i in range(3)]
    (without, with_), gold = ce.prompts(ct.TASKS_BY_LABEL["jeopardy"], lm_items, 1)
    j, k = ce.fewshot_indices(3, 1, 10)  # 10 shots capped to the 2 others
    shots = f"C{j}\nAnswer: X{j}\n\nC{k}\nAnswer: X{k}\n\n"
    assert with_ == shots + "C1\nAnswer: X1" and without == shots + "C1\nAnswer:" and gold == 0
    (without, with_), _ = ce.prompts(ct.TASKS_BY_LABEL["lambada_openai"], lm_items, 0)  # 0-shot
    assert (without, with_) == ("C0", "C0 X0")


def test_multiple_choice_scores_only_after_the_prefix_all_choices_share(tok):
    items = [{"query": "Answer:", "choices": ["the cat sat", "the cat is red"], "gold": 0}]
    q = ce.build_query(tok, ct.TASKS_BY_LABEL["copa"], items, 0, 1000)
    bos = tok.bos_id
    assert [s.tokens for s in q.seqs] == [(bos, 290, 309, 300, 34, 276, 326, 283, 268),
                                          (bos, 290, 309, 300, 34, 276, 326, 267, 285)]
    # " the", " cat" are common to both choices: only " s" "at" / " is" " red" are scored
    assert [s.tokens[s.start:] for s in q.seqs] == [(283, 268), (267, 285)] and q.seqs[0].start == 7


def test_schema_scores_only_the_suffix_all_options_share(tok):
    items = [{"context_options": ["The capital of France", "The cat"], "continuation": "is Rome.", "gold": 1}]
    q = ce.build_query(tok, ct.TASKS_BY_LABEL["winograd"], items, 0, 1000)
    bos = tok.bos_id
    assert q.seqs[0].tokens == (bos, 277, 287, 288, 316, 325, 267, 320, 305, 22)
    assert q.seqs[1].tokens == (bos, 277, 326, 267, 320, 305, 22)
    assert [s.tokens[s.start:] for s in q.seqs] == [(267, 320, 305, 22)] * 2  # " is", " Ro", "me", "."
    # options ending alike: the shared tail of the options is scored too, as nanochat does
    items = [{"context_options": ["The capital of France is", "The cat is"], "continuation": "red", "gold": 0}]
    q = ce.build_query(tok, ct.TASKS_BY_LABEL["winograd"], items, 0, 1000)
    assert [tok.decode(s.tokens[s.start:]) for s in q.seqs] == [" is red"] * 2


def test_language_modeling_span_starts_after_the_stripped_prompt(tok):
    items = [{"context": "The capital of France is ", "continuation": "Paris"}]  # trailing space in the data
    q = ce.build_query(tok, ct.TASKS_BY_LABEL["lambada_openai"], items, 0, 1000)
    (seq,) = q.seqs
    assert seq.tokens == (tok.bos_id, 277, 287, 288, 316, 325, 267, 318, 308)
    assert seq.tokens[seq.start:] == (318, 308)  # " Pa" "ris": the delimiter's space merges into the answer
    assert tok.decode(seq.tokens[seq.start:]) == " Paris"


def test_items_are_shuffled_cut_and_shots_drawn_from_the_cut_list():
    order = list(range(40))
    random.Random(1337).shuffle(order)
    assert ct.core_order(40, None) == order and ct.core_order(40, 8) == order[:8]
    items = [{"context": f"c{i}", "continuation": f"w{i}"} for i in range(40)]

    class Recorder:
        def __init__(self):
            self.seen = []

        def greedy_match(self, query):
            self.seen.append(bytes(t for t in query.seqs[0].tokens if t < 256).decode())
            return False

    rec = Recorder()
    ce.evaluate_task(Stub(), ByteTok(), items, ct.Task("t", "t", ct.LM, 2), max_items=8, scorer=rec)
    chosen = [items[i] for i in order[:8]]
    for pos, text in enumerate(rec.seen):
        j, k = random.Random(1234 + pos).sample([p for p in range(8) if p != pos], 2)
        assert text == (f"{chosen[j]['context']} {chosen[j]['continuation']}\n\n"
                        f"{chosen[k]['context']} {chosen[k]['continuation']}\n\n"
                        f"{chosen[pos]['context']} {chosen[pos]['continuation']}")
    assert len(rec.seen) == 8


def test_crop_keeps_the_last_tokens_and_shifts_the_span(tok):
    assert ce.crop(ce.Seq((9, 1, 2, 3, 4, 5), 4), 4) == ce.Seq((2, 3, 4, 5), 2)
    assert ce.crop(ce.Seq((9, 1, 2), 2), 8) == ce.Seq((9, 1, 2), 2)
    assert ce.crop(ce.Seq((9, 1, 2, 3, 4, 5), 2), 3) == ce.Seq((3, 4, 5), 1)  # span too long: its tail
    items = [{"query": f"Question: what is red number {i}? Answer:", "choices": ["an apple", "the sky is blue"],
              "gold": 0} for i in range(12)]
    full = ce.build_query(tok, ct.TASKS_BY_LABEL["arc_easy"], items, 4, 10_000)
    cropped = ce.build_query(tok, ct.TASKS_BY_LABEL["arc_easy"], items, 4, 24)
    for f, c in zip(full.seqs, cropped.seqs):
        assert len(f.tokens) > 24 and len(c.tokens) == 24
        assert c.tokens == f.tokens[-24:]
        assert c.tokens[c.start:] == f.tokens[f.start:]  # the whole scored span survives


# ---------------------------------------------------------------- scoring with a GPT

def test_model_scorer_batches_choices_like_separate_forwards(tok):
    model = tiny_gpt(tok.vocab_size)
    items = [{"query": "Question: what is red? Answer:", "choices": ["an apple", "the sky", "no"], "gold": 0}]
    q = ce.build_query(tok, ct.TASKS_BY_LABEL["copa"], items, 0, 64)
    assert len({len(s.tokens) for s in q.seqs}) > 1  # padding is exercised
    batched = ce.ModelScorer(model).mean_losses(q)
    for seq, got in zip(q.seqs, batched):
        ids = torch.tensor([seq.tokens])
        targets = torch.full_like(ids, -1)
        targets[0, seq.start - 1:-1] = ids[0, seq.start:]
        loss = model(ids, targets, loss_reduction="none")
        assert got == pytest.approx((loss.sum() / (targets >= 0).sum()).item(), rel=1e-5)


def test_model_scorer_greedy_match(tok):
    model = tiny_gpt(tok.vocab_size)
    prompt = [tok.bos_id] + tok.encode("The cat sat on")
    greedy = list(model.generate(prompt, 3, temperature=0))
    good = ce.Query(ct.LM, (ce.Seq(tuple(prompt + greedy), len(prompt)),), 0)
    wrong = greedy[:2] + [(greedy[2] + 1) % tok.vocab_size]
    bad = ce.Query(ct.LM, (ce.Seq(tuple(prompt + wrong), len(prompt)),), 0)
    scorer = ce.ModelScorer(model)
    assert scorer.greedy_match(good) is True
    assert scorer.greedy_match(bad) is False


def test_evaluate_task_with_a_real_model(tok):
    model = tiny_gpt(tok.vocab_size, seq=48)
    items = [{"query": f"Question: what is red {i}? Answer:", "choices": ["an apple", "the sky", "the cat", "no"],
              "gold": i % 4} for i in range(8)]
    row = ce.evaluate_task(model, tok, items, "arc_easy", "cpu")
    assert row["n"] == 8 and 0 <= row["accuracy"] <= 1 and row["baseline"] == 25.0
    assert row["centered"] == pytest.approx((row["accuracy"] - 0.25) / 0.75)
    assert ce.evaluate_task(model, tok, items, "arc_easy", "cpu") == row  # deterministic


# ---------------------------------------------------------------- hand-made cases with a stub scorer

def test_hand_made_items_per_task_type():
    mc = [{"query": "Pick", "choices": ["bad", "good"], "gold": 1},
          {"query": "Pick", "choices": ["good", "bad", "bad", "bad"], "gold": 0},
          {"query": "Pick", "choices": ["bad", "good"], "gold": 0}]  # the scorer picks 1: wrong
    row = ce.evaluate_task(Stub(), ByteTok(), mc, ct.Task("m", "m", ct.MC, 1), scorer=KeywordScorer())
    assert (row["correct"], row["n"]) == (2, 3)
    assert row["baseline"] == pytest.approx(100 * (0.5 + 0.25 + 0.5) / 3)

    schema = [{"context_options": ["It was bad", "It was good"], "continuation": "indeed.", "gold": 1},
              {"context_options": ["It was good", "It was bad"], "continuation": "indeed.", "gold": 1}]

    class ContextScorer(KeywordScorer):  # schema: the contexts differ, so look at the whole sequence
        def _cont(self, seq):
            return bytes(t for t in seq.tokens if t < 256).decode().split("indeed")[0][-5:]

    row = ce.evaluate_task(Stub(), ByteTok(), schema, "winogrande", scorer=ContextScorer())
    assert (row["correct"], row["accuracy"], row["centered"]) == (1, 0.5, 0.0)

    lm = [{"context": "a", "continuation": "good"}, {"context": "b", "continuation": "bad"},
          {"context": "c", "continuation": "very good"}]
    row = ce.evaluate_task(Stub(), ByteTok(), lm, "bigbench_operators", scorer=KeywordScorer())
    assert (row["correct"], row["baseline"]) == (2, 0.0) and row["centered"] == pytest.approx(2 / 3)


def test_max_items_takes_a_seeded_shuffle():
    items = [{"context": f"c{i}", "continuation": "good" if i % 3 == 0 else "bad"} for i in range(50)]
    row = ce.evaluate_task(Stub(), ByteTok(), items, "lambada_openai", max_items=10, scorer=KeywordScorer())
    order = list(range(50))
    random.Random(1337).shuffle(order)
    assert row["n"] == 10 and row["correct"] == sum(1 for i in order[:10] if i % 3 == 0)


def _write_task(dir_: Path, task: ct.Task, n: int = 4):
    if task.kind == ct.MC:
        rows = [{"query": f"q{i}", "choices": ["x", "y", "z"], "gold": i % 3} for i in range(n)]
    elif task.kind == ct.SCHEMA:
        rows = [{"context_options": ["p", "q"], "continuation": "r", "gold": i % 2} for i in range(n)]
    else:
        rows = [{"context": f"c{i}", "continuation": "w"} for i in range(n)]
    (dir_ / f"{task.dataset}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_aggregate_is_core_only_when_all_22_ran(tmp_path):
    full, partial, empty = tmp_path / "full", tmp_path / "partial", tmp_path / "empty"
    for d in (full, partial, empty):
        d.mkdir()
    for task in ct.TASKS:
        _write_task(full, task)
        if task.label not in ("squad", "coqa"):
            _write_task(partial, task)
    res = ce.evaluate_core(Stub(), ByteTok(), full, scorer=ce.OracleScorer())
    assert res["aggregate"]["name"] == "CORE" and res["CORE"] == pytest.approx(1.0)
    assert len(res["aggregate"]["tasks"]) == 22 and res["aggregate"]["missing"] == []

    res = ce.evaluate_core(Stub(), ByteTok(), partial, scorer=ce.OracleScorer())
    assert res["aggregate"]["name"] == "CORE-20 (partial)" and "CORE" not in res
    assert res["tasks"]["squad"]["status"] == ct.NOT_RUN and res["aggregate"]["missing"] == ["squad", "coqa"]

    res = ce.evaluate_core(Stub(), ByteTok(), empty, scorer=ce.OracleScorer())
    assert res["aggregate"] == {"name": "CORE-0 (partial)", "value": None, "tasks": [], "missing": list(ct.TASKS_BY_LABEL)}


def test_given_baselines_override_derived_ones(tmp_path):
    _write_task(tmp_path, ct.TASKS_BY_LABEL["boolq"])
    res = ce.evaluate_core(Stub(), ByteTok(), tmp_path, scorer=ce.UniformScorer(0), baselines={"boolq": 62})
    row = res["tasks"]["boolq"]
    assert (row["baseline"], row["baseline_source"]) == (62, "given")
    assert row["centered"] == pytest.approx((row["accuracy"] - 0.62) / 0.38)


# ---------------------------------------------------------------- the shared data: oracle and uniform

def test_oracle_scores_centered_one_on_every_shared_task():
    core = shared_data() / "eval" / "core"
    res = ce.evaluate_core(Stub(), ByteTok(), core, max_per_task=6, scorer=ce.OracleScorer())
    agg = res["aggregate"]
    assert agg["name"] == "CORE-18 (partial)" and "CORE" not in res
    assert sorted(agg["tasks"]) == sorted(SHARED_18) and sorted(agg["missing"]) == sorted(MISSING_4)
    for label in SHARED_18:
        row = res["tasks"][label]
        assert row["status"] == "ok" and row["n"] == 6 and row["centered"] == pytest.approx(1.0), label
    for label in MISSING_4:
        assert res["tasks"][label]["status"] == "not run: data unavailable"
    assert res["CORE-18 (partial)"] == pytest.approx(1.0)
    # DCLM's published baselines, as nanochat centers with them
    assert res["tasks"]["boolq"]["baseline"] == 62 and res["tasks"]["boolq"]["baseline_source"] == "DCLM"
    assert res["tasks"]["arc_easy"]["baseline"] == 25.0 and res["tasks"]["piqa"]["baseline"] == 50.0
    assert res["tasks"]["winograd"]["baseline"] == 50.0 and res["tasks"]["jeopardy"]["baseline"] == 0.0


def test_uniform_guessing_centers_near_zero():
    core = shared_data() / "eval" / "core"
    n = 300
    centered = []
    for label in ("arc_easy", "commonsense_qa", "openbook_qa", "bigbench_language_identification"):
        task = ct.TASKS_BY_LABEL[label]
        items = ct.load_items(core / f"{task.dataset}.jsonl")
        row = ce.evaluate_task(Stub(), ByteTok(), items, task, max_items=n, scorer=ce.UniformScorer(7),
                               baseline=ct.derived_baseline(task, items))  # 1/choices, not DCLM's
        # binomial sd of centered accuracy at p = 1/4: sqrt(p(1-p)/n)/(1-p) ≈ 0.033; allow ~5 sd
        assert abs(row["centered"]) < 0.17, (label, row)
        centered.append(row["centered"])
    assert abs(sum(centered) / len(centered)) < 0.09  # pooled: sd ≈ 0.017
    lm = ce.evaluate_task(Stub(), ByteTok(), ct.load_items(core / "bigbench_operators.jsonl"), "bigbench_operators",
                          max_items=20, scorer=ce.UniformScorer())
    assert lm["centered"] == 0.0
