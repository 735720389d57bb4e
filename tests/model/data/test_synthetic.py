"""The generated conversation sources: deterministic, valid, calculator-true, in the eval's formats."""
from __future__ import annotations

import itertools

from model.chat.calculator import evaluate
from model.chat.conversation import validate
from model.data import synthetic
from model.evals.chat_tasks import SPELLING_TEMPLATES, gsm8k_answer, spelling_answer, spellingbee_items

WORDS = ["strawberry", "banana", "apple", "mississippi", "committee", "bookkeeper"]


def take(stream, n):
    return list(itertools.islice(stream, n))


def reply_text(record) -> str:
    content = record["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def test_arithmetic_is_seeded_and_prefix_stable():
    a = take(synthetic.arithmetic(7), 60)
    assert a == take(synthetic.arithmetic(7), 60)
    assert take(synthetic.arithmetic(7), 20) == a[:20]
    assert a != take(synthetic.arithmetic(8), 60)
    assert len({r["messages"][0]["content"] for r in a}) > 50  # varied


def test_arithmetic_calls_the_calculator_and_ends_with_the_answer():
    for record in take(synthetic.arithmetic(1), 300):
        validate(record["messages"])
        parts = record["messages"][1]["content"]
        calls = [(p, q) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
        assert calls, record
        for call, output in calls:
            assert output["type"] == "python_output" and output["text"] == evaluate(call["text"])
        assert parts[-1]["type"] == "text" and parts[-1]["text"].endswith(f"#### {record['answer']}")
        assert gsm8k_answer(reply_text(record)) == record["answer"]
        assert record["answer"] == parts[-2]["text"]  # the answer is the last calculator result


def test_spelling_spells_letter_by_letter():
    records = take(synthetic.spelling(WORDS, 3), 40)
    assert records == take(synthetic.spelling(WORDS, 3), 40)
    for r in records:
        validate(r["messages"])
        word, letters = r["messages"][1]["content"].split(":")
        assert word in WORDS and letters.split(",") == list(word) and word in r["messages"][0]["content"]
        assert r["answer"] is None


def test_spellingbee_uses_the_eval_format_and_counts_right():
    records = take(synthetic.spellingbee(WORDS, 5), 100)
    assert records == take(synthetic.spellingbee(WORDS, 5), 100)
    # the user message is exactly what chat_eval's SpellingBee asks (same generator, same seed)
    assert [r["messages"][0]["content"] for r in records] == [it["question"] for it in spellingbee_items(WORDS, 100, 5)]
    templates = [t.split("{")[0] for t in SPELLING_TEMPLATES]
    for r, item in zip(records, spellingbee_items(WORDS, 100, 5)):
        validate(r["messages"])
        assert any(r["messages"][0]["content"].startswith(t) for t in templates)
        assert r["answer"] == str(item["answer"]) == str(item["word"].count(item["letter"]))
        assert spelling_answer(reply_text(r)) == item["answer"]
        parts = r["messages"][1]["content"]
        call = next(i for i, p in enumerate(parts) if p["type"] == "python")
        assert parts[call + 1]["text"] == evaluate(parts[call]["text"]) == r["answer"]


def test_spellingbee_never_makes_an_excluded_pair():
    items = spellingbee_items(WORDS, 2048, 11)
    exclude = frozenset((it["word"], it["letter"]) for it in items[:150])
    pair_of = {it["question"]: (it["word"], it["letter"]) for it in items}
    made = [pair_of[r["messages"][0]["content"]] for r in take(synthetic.spellingbee(WORDS, 11, exclude=exclude), 300)]
    assert len(made) == 300 and not set(made) & exclude


def test_identity_conversations_are_valid_and_say_who_trained_the_model():
    convs = synthetic.identity()
    assert len(convs) >= 30 and convs == synthetic.identity()
    for c in convs:
        validate(c["messages"])
        assert c["messages"][-1]["role"] == "assistant" and c["answer"] is None
    text = " ".join(m["content"] for c in convs for m in c["messages"])
    assert "chatforge" in text and "nanochat" in text and "from scratch" in text
    assert any(len(c["messages"]) > 2 for c in convs) and any(c["messages"][0]["role"] == "system" for c in convs)
