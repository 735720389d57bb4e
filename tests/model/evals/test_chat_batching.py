"""chat_eval batched across items answers every item as alone: bitwise-equal letter logits whatever the batch,
and greedy replies on real GSM8K prompts equal to one prompt at a time."""
from __future__ import annotations

import pytest
import torch

from helpers import opinionated_gpt, shared_data, small_bpe
from model.evals import chat_eval as ev
from model.nn.gpt import GPT

TEXT = ("What is the capital of France? A. Paris B. Rome C. Madrid D. Berlin. Reply with the letter. "
        "Janet has 16 eggs and eats 3, so 16 - 3 = 13. #### 13 ") * 3


@pytest.fixture(scope="module")
def tok():
    return small_bpe(TEXT, 400, repeat=10)


def tiny_gpt(vocab: int, seq: int) -> GPT:
    return opinionated_gpt(vocab, seq, n_head=2, n_embd=32, std=1.0)


def mc_items(n: int) -> list[dict]:
    import json

    rows = (shared_data() / "eval" / "mmlu_test.jsonl").read_text().splitlines()[:n]
    items = []
    for line in rows:
        r = json.loads(line)
        items.append({"question": r["question"], "choices": [r[f"answer_{c}"] for c in "abcd"],
                      "answer": "ABCD".index(r["correct_answer"])})
    return items


def test_letter_logits_are_bitwise_the_same_in_any_batch(tok):
    model = tiny_gpt(tok.vocab_size, seq=512)  # some prompts are cropped to the context
    items = mc_items(24)
    prompts = [ev.prompt_ids("mmlu", it, tok) for it in items]
    letters = [ev.letter_token_ids(tok, len(it["choices"])) for it in items]
    assert len({ev.ModelAnswerer(model, tok)._width(p) for p in prompts}) > 1  # several widths
    alone = ev.ModelAnswerer(model, tok, batch_size=1).letter_logits(prompts, letters)
    for batch in (3, 8, 64):
        assert ev.ModelAnswerer(model, tok, batch_size=batch).letter_logits(prompts, letters) == alone  # bit for bit
    chosen = ev.ModelAnswerer(model, tok, batch_size=8).choose(prompts, letters)
    assert chosen == [max(range(len(x)), key=x.__getitem__) for x in alone]
    assert len({tuple(x) for x in alone}) == len(alone)  # each row read at its own position


def test_greedy_replies_on_real_gsm8k_prompts_equal_one_at_a_time(tok):
    import json

    model = tiny_gpt(tok.vocab_size, seq=256)
    rows = (shared_data() / "eval" / "gsm8k_test.jsonl").read_text().splitlines()[:10]
    prompts = [ev.prompt_ids("gsm8k", {"question": json.loads(r)["context"]}, tok) for r in rows]
    single = ev.ModelAnswerer(model, tok, batch_size=1).complete(prompts, 12)
    assert ev.ModelAnswerer(model, tok, batch_size=10).complete(prompts, 12) == single
    assert ev.ModelAnswerer(model, tok, batch_size=4).complete(prompts, 12) == single
