"""Chat eval: prompts, answer extraction, HumanEval programs in the sandbox, SpellingBee items, the GPT
answerer (batched = one at a time), oracle/uniform doubles (1 and ≈0), partial naming, 2 ranks = 1 rank."""
from __future__ import annotations

import importlib.util
import json
import random
import string

import pytest
import torch

from helpers import SHARED_DATA, small_bpe
from model.evals import chat_eval as ev
from model.evals import chat_tasks as ct
from model.errors import InputError
from model.nn.gpt import GPT, GPTConfig
from model.data.tokenizer import Tokenizer

HAVE_SANDBOX = importlib.util.find_spec("model.evals.sandbox") is not None
needs_sandbox = pytest.mark.skipif(not HAVE_SANDBOX, reason="model/evals/sandbox.py not built yet")
EVAL_DATA = SHARED_DATA / "eval"

TEXT = ("What is the capital of France? A. Paris B. Rome C. Madrid D. Berlin. Reply with the letter. "
        "How many times does the letter r appear in the word strawberry? def add(a, b): return a + b "
        "Janet has 16 eggs and eats 3, so 16 - 3 = 13. #### 13 ") * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return small_bpe(TEXT, 400, repeat=10)


def tiny_gpt(vocab: int, seq: int = 64, seed: int = 0, n_layer: int = 1, std: float = 0.5) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=32, sequence_len=seq))
    with torch.no_grad():  # zero-init head/projections give all-equal logits; make the model opinionated
        for name, p in model.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.normal_(0, std)
    return model.eval()


# ---------------------------------------------------------------- hand-made items, one small set per task

ADD_PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b.\n    >>> add(2, 3)\n    5\n    """\n'
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
PAL_PROMPT = ('import math\n\n\ndef is_pal(s: str) -> bool:\n    return s == s[::-1]\n\n\n'
              'def count_pals(words: list) -> int:\n    """How many words are palindromes."""\n')
PAL_TEST = "def check(candidate):\n    assert candidate(['aba', 'ab', 'x']) == 2\n    assert candidate([]) == 0\n"

HANDMADE: dict[str, list[dict]] = {
    "arc_easy": [
        {"id": "e1", "question": "Which is a mammal?", "choices": ["shark", "whale", "trout"], "answer": 1, "subject": ""},
        {"id": "e2", "question": "What melts ice?", "choices": ["heat", "cold", "dark", "wind"], "answer": 0, "subject": ""},
        {"id": "e3", "question": "Which is a planet?", "choices": ["Sun", "Moon", "Mars", "Io", "Vega"], "answer": 2,
         "subject": ""},
    ],
    "arc_challenge": [
        {"id": "c1", "question": "Which gas do plants take in?", "choices": ["oxygen", "helium", "carbon dioxide", "neon"],
         "answer": 2, "subject": ""},
        {"id": "c2", "question": "What causes tides?", "choices": ["wind", "the Moon"], "answer": 1, "subject": ""},
    ],
    "mmlu": [
        {"id": "m1", "question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"},
        {"id": "m2", "question": "The capital of France is", "choices": ["Rome", "Madrid", "Berlin", "Paris"], "answer": 3,
         "subject": "geography"},
        {"id": "m3", "question": "H2O is", "choices": ["water", "salt", "gold", "iron"], "answer": 0, "subject": "chemistry"},
    ],
    "gsm8k": [
        {"id": "g1", "question": "Janet has 16 eggs and eats 3. How many are left?",
         "solution": "16 - 3 = <<16-3=13>>13\n#### 13", "answer": "13"},
        {"id": "g2", "question": "A shop sells 1,000 pens and 234 pencils. How many items?",
         "solution": "1000 + 234 = 1234\n#### 1,234", "answer": "1234"},
        {"id": "g3", "question": "Split 7 dollars in two.", "solution": "7 / 2 = 3.5\n#### $3.50", "answer": "3.5"},
    ],
    "humaneval": [
        {"id": "HumanEval/a", "prompt": ADD_PROMPT, "test": ADD_TEST, "entry_point": "add",
         "canonical_solution": "    return a + b\n"},
        {"id": "HumanEval/b", "prompt": PAL_PROMPT, "test": PAL_TEST, "entry_point": "count_pals",
         "canonical_solution": "    return sum(1 for w in words if is_pal(w))\n"},
    ],
    "spellingbee": ct.spellingbee_items(["strawberry", "banana", "apple", "mississippi"], 4, seed=0),
}


def synthetic_mc(n: int, seed: int) -> list[dict]:
    """Many 4-way arithmetic items: enough for a uniform guesser's centered accuracy to settle near 0."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(1, 500), rng.randint(1, 500)
        wrong = rng.sample([a + b + d for d in range(-9, 10) if d], 3)
        choices = [str(a + b)] + [str(w) for w in wrong]
        rng.shuffle(choices)
        items.append({"id": f"s{i}", "question": f"What is {a} + {b}?", "choices": choices,
                      "answer": choices.index(str(a + b)), "subject": "arithmetic"})
    return items


# ---------------------------------------------------------------- prompts and answer extraction

def test_render_mc_letters_the_choices_and_asks_for_the_letter_only():
    text = ct.render_mc("Which is a planet?", ["Sun", "Moon", "Mars"])
    assert text == ("Which is a planet?\n\nA. Sun\nB. Moon\nC. Mars\n\n"
                    "Reply with the letter of the correct answer (A, B or C) and nothing else.")
    assert "E. five" in ct.render_mc("q", ["one", "two", "three", "four", "five"])
    with pytest.raises(InputError):
        ct.render_mc("q", ["only one"])


def test_prompts_are_single_user_turns_ending_at_assistant_start_without_the_gold(tok):
    for task, items in HANDMADE.items():
        for item in items:
            ids = ev.prompt_ids(task, item, tok)
            assert ids[0] == tok.bos_id and ids[-1] == tok.special_id("<|assistant_start|>")
            assert ids[1] == tok.special_id("<|user_start|>") and ids[-2] == tok.special_id("<|user_end|>")
    he = ct.user_message("humaneval", HANDMADE["humaneval"][0])
    assert "```python\n" + ADD_PROMPT.rstrip() + "\n```" in he and "return a + b" not in he
    assert ct.user_message("gsm8k", HANDMADE["gsm8k"][0]) == HANDMADE["gsm8k"][0]["question"]


@pytest.mark.parametrize("reply, expected", [
    ("16 - 3 = 13\n#### 13", "13"),
    ("so the total is\n#### 1,234", "1234"),
    ("#### $5.", "5"),
    ("#### -3.5 dollars", "-3.5"),
    ("first #### 3, then I fixed it: #### 4", "4"),
    ("The answer is 72.", None),
    ("#### none", None),
])
def test_gsm8k_answer_is_the_number_after_the_last_marker(reply, expected):
    assert ct.gsm8k_answer(reply) == expected


def test_gsm8k_numbers_compare_as_floats():
    assert ct.numbers_equal("5", "5.0") and ct.numbers_equal("1234", "1,234") and ct.numbers_equal("-3.50", "-3.5")
    assert not ct.numbers_equal("5", "6") and not ct.numbers_equal(None, "5")


@pytest.mark.parametrize("reply, expected", [
    ("3", 3),
    ("s-t-r-a-w-b-e-r-r-y: there are 3 r's", 3),
    ("I count 1, 2, 3 of them, so the answer is 3", 3),
    ("#### 2\n(I first thought 5)", 2),
    ("there are 2.0", 2),
    ("about 2.5", None),
    ("none at all", None),
])
def test_spelling_answer_is_the_last_integer_or_the_marked_one(reply, expected):
    assert ct.spelling_answer(reply) == expected


def test_extract_code_prefers_the_first_python_or_untagged_fence():
    assert ct.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert ct.extract_code("```\nx = 1\n```\n```python\ny = 2\n```") == "x = 1\n"
    assert ct.extract_code("```text\nhello\n```\n```py\nz = 3\n```") == "z = 3\n"
    assert ct.extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # truncated reply
    assert ct.extract_code("    return a + b\n") == "    return a + b\n"


def test_humaneval_program_shapes():
    item = HANDMADE["humaneval"][0]
    whole = ct.humaneval_program(item, "Sure:\n```python\ndef add(a, b):\n    return a + b\n```")
    assert whole.startswith(ADD_PROMPT.rstrip()) and "def add(a, b):\n    return a + b" in whole
    assert whole.rstrip().endswith("check(add)") and "def check(candidate)" in whole
    body = ct.humaneval_program(item, "    return a + b\n")
    assert body.startswith(ADD_PROMPT + "    return a + b")
    broken = dict(item, prompt="import math\nfrom typing import List\ndef add(a, b):\n")  # stub without a body
    assert ct.humaneval_program(broken, "def add(a, b):\n    return a + b\n").startswith(
        "import math\nfrom typing import List\n\n\ndef add(a, b):")


@needs_sandbox
def test_humaneval_programs_pass_and_fail_in_the_sandbox():
    from model.evals.sandbox import run_program

    add, pal = HANDMADE["humaneval"]
    passing = [(add, "```python\ndef add(a, b):\n    return a + b\n```"), (add, "    return a + b\n"),
               (add, "def add(a, b):\n    return sum([a, b])"),
               (pal, "```python\ndef count_pals(words):\n    return sum(map(is_pal, words))\n```")]  # prompt's helper
    for item, reply in passing:
        outcome = run_program(ct.humaneval_program(item, reply))
        assert outcome.passed and outcome.status == "passed", (reply, outcome.detail)
    wrong = run_program(ct.humaneval_program(add, "    return a - b\n"))
    assert not wrong.passed and wrong.status == "failed"
    garbage = run_program(ct.humaneval_program(add, "qwe rty"))
    assert not garbage.passed


def test_spellingbee_items_are_reproducible_and_counted():
    words = ["strawberry", "banana", "Apple", "it's", "café", "kiwi"]
    items = ct.spellingbee_items(words, 200, seed=3)
    assert items == ct.spellingbee_items(words, 200, seed=3) != ct.spellingbee_items(words, 200, seed=4)
    assert {it["word"] for it in items} <= {"strawberry", "banana", "apple", "kiwi"}
    for it in items:
        assert it["answer"] == it["word"].count(it["letter"]) and len(it["letter"]) == 1
        assert f"'{it['letter']}'" in it["question"] or f"{it['letter']}'s" in it["question"]
        assert it["word"] in it["question"]
    present = sum(it["answer"] > 0 for it in items) / len(items)
    assert 0.5 <= present <= 0.8  # half chosen from the word, plus random letters that happen to be in it
    assert len({it["question"].split(it["word"])[0][:12] for it in items}) >= 3  # several templates
    with pytest.raises(InputError):
        ct.spellingbee_items(["123", ""], 5, seed=0)


def test_letter_tokens_must_be_single(tok):
    ids = ev.letter_token_ids(tok, 5)
    assert len(set(ids)) == 5 and [tok.decode([i]) for i in ids] == list("ABCDE")

    class SplitsLetters:
        def encode(self, text):
            return [1, 2]

    with pytest.raises(InputError, match="one token per letter"):
        ev.letter_token_ids(SplitsLetters(), 4)


def test_selection_is_seeded_and_ranks_partition_it():
    order = list(range(50))
    random.Random(1337).shuffle(order)
    assert ev.select(50, 10) == order[:10]
    assert ev.select(50, None) == list(range(50)) and ev.select(5, 10) == list(range(5))
    parts = [ev.select(50, 10, r, 3) for r in range(3)]
    assert parts[0] == order[0:10:3] and sorted(sum(parts, [])) == sorted(order[:10])


# ---------------------------------------------------------------- doubles: oracle 1, uniform ≈ 0

def check_doubles(tok, items: dict[str, list[dict]], max_per_task: int | None) -> None:
    oracle = ev.evaluate_chat(None, tok, items, answerer=ev.OracleAnswerer(tok, items), max_per_task=max_per_task,
                              workers=2)
    assert oracle["aggregate"]["name"] == "ChatCORE" and oracle["ChatCORE"] == pytest.approx(1.0)
    for task, row in oracle["tasks"].items():
        assert row["status"] == "ok" and row["correct"] == row["n"] and row["centered"] == pytest.approx(1.0), row
    assert oracle["tasks"]["humaneval"]["statuses"] == {"passed": oracle["tasks"]["humaneval"]["n"]}

    uniform = ev.evaluate_chat(None, tok, items, answerer=ev.UniformAnswerer(seed=0), max_per_task=max_per_task,
                               workers=2)
    for task, row in uniform["tasks"].items():
        if row["type"] == "generative":
            assert row["correct"] == 0 and row["centered"] == 0.0, row
        else:
            assert abs(row["centered"]) <= 0.1, row
    assert abs(uniform["ChatCORE"]) <= 0.05
    assert "passed" not in uniform["tasks"]["humaneval"]["statuses"]
    assert uniform["tasks"]["gsm8k"]["statuses"] == {"no_answer": uniform["tasks"]["gsm8k"]["n"]}


@needs_sandbox
def test_oracle_scores_one_and_uniform_about_zero_on_handmade_items(tok):
    items = dict(HANDMADE, arc_easy=HANDMADE["arc_easy"] + synthetic_mc(300, 1),
                 arc_challenge=synthetic_mc(300, 2), mmlu=HANDMADE["mmlu"] + synthetic_mc(300, 3),
                 spellingbee=ct.spellingbee_items(["strawberry", "banana", "apple"], 50, seed=1))
    check_doubles(tok, items, None)


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def real_items() -> dict[str, list[dict]]:
    """The shared eval files converted to the evalset stage's normalized formats."""
    if not EVAL_DATA.is_dir():
        pytest.skip(f"{EVAL_DATA} is absent (a fresh clone has no ../shared); these tests need its data")
    arc = {name: [{"id": f"{name}-{i}", "question": r["query"].removeprefix("Question: "), "choices": r["choices"],
                   "answer": r["gold"], "subject": ""} for i, r in enumerate(_jsonl(EVAL_DATA / "core" / f"{name}.jsonl"))]
           for name in ("arc_easy", "arc_challenge")}
    # the file is sorted by topic, so take every 20th item for a spread of subjects
    mmlu = [{"id": f"mmlu-{i}", "question": r["question"], "choices": [r[f"answer_{c}"] for c in "abcd"],
             "answer": "ABCD".index(r["correct_answer"]), "subject": r["topic"]}
            for i, r in enumerate(_jsonl(EVAL_DATA / "mmlu_test.jsonl")) if i % 20 == 0]
    gsm = [{"id": f"gsm8k-{i}", "question": r["context"], "solution": f"{r['chain_of_thought']}\n#### {r['answer']}",
            "answer": r["answer"].replace(",", "")} for i, r in enumerate(_jsonl(EVAL_DATA / "gsm8k_test.jsonl"))]
    humaneval = [{"id": r["task_id"], **{k: r[k] for k in ("prompt", "test", "entry_point", "canonical_solution")}}
                 for r in _jsonl(EVAL_DATA / "humaneval.jsonl")]
    words = sorted({w.strip(string.punctuation).lower() for r in gsm[:200] for w in r["question"].split()})
    return {**arc, "mmlu": mmlu, "gsm8k": gsm, "humaneval": humaneval,
            "spellingbee": ct.spellingbee_items(words, 300, seed=0)}


def humaneval_sample(items: list[dict]) -> list[dict]:
    """Every 8th task plus the four whose prompts define helpers the solution calls (a sandbox run costs ~0.2 s)."""
    keep = set(range(0, len(items), 8)) | {10, 32, 38, 50}
    return [item for i, item in enumerate(items) if i in keep]


@needs_sandbox
def test_oracle_scores_one_and_uniform_about_zero_on_real_data(tok):
    items = real_items()
    items["humaneval"] = humaneval_sample(items["humaneval"])
    check_doubles(tok, items, 300)


@needs_sandbox
def test_real_humaneval_whole_function_replies_pass():
    """The other program shape: a chat reply that restates the whole function in a fence."""
    from model.evals.sandbox import run_program

    for item in humaneval_sample(real_items()["humaneval"]):
        reply = f"Here is the function:\n```python\n{item['prompt']}{item['canonical_solution']}```\nIt works."
        outcome = run_program(ct.humaneval_program(item, reply))
        assert outcome.passed, (item["id"], outcome.status, outcome.detail)


# ---------------------------------------------------------------- the GPT answerer

def test_batched_letter_scoring_equals_one_at_a_time_and_a_plain_forward(tok):
    model = tiny_gpt(tok.vocab_size, seq=80, n_layer=2, std=1.0)  # a seed whose letters depend on the prompt
    items = HANDMADE["arc_easy"] + HANDMADE["mmlu"] + synthetic_mc(6, 5)
    task_of = ["arc_easy"] * 3 + ["mmlu"] * 9
    prompts = [ev.prompt_ids(t, it, tok) for t, it in zip(task_of, items)]
    letters = [ev.letter_token_ids(tok, len(it["choices"])) for it in items]
    assert max(map(len, prompts)) > 80 > min(map(len, prompts))  # some prompts are cropped
    batched = ev.ModelAnswerer(model, tok, batch_size=5).choose(prompts, letters)
    single = ev.ModelAnswerer(model, tok, batch_size=1).choose(prompts, letters)
    with torch.no_grad():
        reference = [int(model(torch.tensor([ev.crop(p, 80)]))[0, -1, ls].argmax()) for p, ls in zip(prompts, letters)]
    assert batched == single == reference
    assert len(set(batched)) > 2  # the answers depend on the prompt, so a misread row or position would show


def test_model_replies_are_greedy_text_without_the_stop_token(tok):
    model = tiny_gpt(tok.vocab_size, seq=48, seed=1)
    prompts = [ev.prompt_ids("gsm8k", it, tok) for it in HANDMADE["gsm8k"]]
    batched = ev.ModelAnswerer(model, tok, batch_size=3).complete(prompts, 6)
    single = ev.ModelAnswerer(model, tok, batch_size=1).complete(prompts, 6)
    assert batched == single and all(isinstance(r, str) for r in batched)
    assert not any("<|assistant_end|>" in r for r in batched)


@needs_sandbox
def test_tiny_gpt_runs_every_task_end_to_end(tok):
    model = tiny_gpt(tok.vocab_size)
    result = ev.evaluate_chat(model, tok, HANDMADE, batch_size=4, max_tokens=8, workers=2)
    assert result["aggregate"] == {"name": "ChatCORE", "value": result["ChatCORE"], "tasks": list(ct.TASK_NAMES),
                                   "missing": []}
    for task, row in result["tasks"].items():
        assert row["status"] == "ok" and row["n"] == len(HANDMADE[task]) and 0 <= row["correct"] <= row["n"]
        assert row["accuracy"] == row["correct"] / row["n"]
        assert -row["baseline"] / (1 - row["baseline"]) - 1e-9 <= row["centered"] <= 1.0
        assert row["type"] == ("categorical" if task in ct.CATEGORICAL else "generative")
    assert result["tasks"]["arc_easy"]["baseline"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)
    assert result["tasks"]["mmlu"]["baseline"] == 0.25 and result["tasks"]["gsm8k"]["baseline"] == 0.0
    assert sum(result["tasks"]["humaneval"]["statuses"].values()) == 2
    assert -1.0 <= result["ChatCORE"] <= 1.0


@needs_sandbox
def test_two_ranks_equal_one(tok):
    model = tiny_gpt(tok.vocab_size, seed=2)
    kwargs = dict(batch_size=2, max_tokens=6, max_per_task=3, workers=2)
    single = ev.evaluate_chat(model, tok, HANDMADE, **kwargs)

    # pass 1: what each rank contributes to every all_reduce call; pass 2: every call returns their sum
    sent: dict[int, list[list[float]]] = {0: [], 1: []}
    for rank in (0, 1):
        ev.evaluate_chat(model, tok, HANDMADE, rank=rank, world_size=2,
                         all_reduce=lambda v, r=rank: sent[r].append(list(v)) or v, **kwargs)
    assert len(sent[0]) == len(sent[1]) == 6
    for rank in (0, 1):
        calls = iter(range(6))

        def summed(v, rank=rank):
            k = next(calls)
            assert v == sent[rank][k]
            return [a + b for a, b in zip(sent[0][k], sent[1][k])]

        assert ev.evaluate_chat(model, tok, HANDMADE, rank=rank, world_size=2, all_reduce=summed, **kwargs) == single


def test_ranks_without_items_still_join_every_reduction(tok):
    items = {"arc_challenge": HANDMADE["arc_challenge"], "gsm8k": HANDMADE["gsm8k"]}
    oracle = ev.OracleAnswerer(tok, items)
    single = ev.evaluate_chat(None, tok, items, answerer=oracle)
    sent: list[list[list[float]]] = [[] for _ in range(5)]
    for rank in range(5):
        # an empty rank's own counts have n = 0; hand back a stand-in so this recording pass can finish
        ev.evaluate_chat(None, tok, items, answerer=oracle, rank=rank, world_size=5,
                         all_reduce=lambda v, r=rank: sent[r].append(list(v)) or [0.0, 1.0] + [0.0] * (len(v) - 2))
    assert [len(calls) for calls in sent] == [2] * 5
    assert [calls[0][1] for calls in sent] == [1, 1, 0, 0, 0]  # n of arc_challenge's 2 items per rank
    calls = iter(range(2))

    def summed(v):
        k = next(calls)
        return [sum(col) for col in zip(*(s[k] for s in sent))]

    assert ev.evaluate_chat(None, tok, items, answerer=oracle, rank=4, world_size=5, all_reduce=summed) == single


# ---------------------------------------------------------------- partial suites and missing data

def test_partial_suites_are_named_by_coverage(tok):
    items = {"arc_easy": HANDMADE["arc_easy"], "mmlu": HANDMADE["mmlu"], "gsm8k": None, "spellingbee": [],
             "arc_challenge": HANDMADE["arc_challenge"]}
    result = ev.evaluate_chat(None, tok, items, answerer=ev.OracleAnswerer(tok, items))
    assert result["aggregate"]["name"] == "ChatCORE-3 (partial)" and "ChatCORE" not in result
    assert result["ChatCORE-3 (partial)"] == pytest.approx(1.0)
    assert result["aggregate"]["tasks"] == ["arc_easy", "arc_challenge", "mmlu"]
    assert result["aggregate"]["missing"] == ["gsm8k", "humaneval", "spellingbee"]
    for task in ("gsm8k", "humaneval", "spellingbee"):
        assert result["tasks"][task] == {"task": task, "status": "not run: data unavailable"}
    empty = ev.evaluate_chat(None, tok, {}, answerer=ev.UniformAnswerer())
    assert empty["aggregate"]["name"] == "ChatCORE-0 (partial)" and empty["aggregate"]["value"] is None
    assert ev.aggregate_name(ct.TASK_NAMES) == "ChatCORE"


def test_bad_arguments_are_clear(tok):
    with pytest.raises(KeyError, match="unknown chat tasks"):
        ev.evaluate_chat(None, tok, {"hellaswag": []}, answerer=ev.UniformAnswerer())
    with pytest.raises(InputError, match="max_per_task"):
        ev.evaluate_task(ev.UniformAnswerer(), tok, "mmlu", HANDMADE["mmlu"], max_items=0)
    with pytest.raises(KeyError, match="not built from"):
        ev.OracleAnswerer(tok, {}).choose([[1, 2]], [[3, 4]])
