"""The chat format: token layout, training mask, system merge, role checks, truncation, context budgeting."""
from __future__ import annotations

import pytest
from tokenizers import pre_tokenizers, trainers

from model.config import SPECIAL_TOKENS
from model.chat.conversation import fit_completion, render, render_for_completion
from model.errors import InputError
from model.data.tokenizer import Tokenizer, _untrained


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A small byte-level BPE with the real special tokens, trained in well under a second."""
    hf = _untrained()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["Hello there, how are you? I am fine. What is 1+2? It is 3."] * 20, trainer=trainer)
    return Tokenizer(hf)


def sp(tok, name):
    return tok.special_id(f"<|{name}|>")


def test_layout_and_mask(tok):
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "What is 1+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "1+2"},
            {"type": "python_output", "text": "3"},
            {"type": "text", "text": "It is 3."},
        ]},
    ]
    ids, mask = render(messages, tok)
    e = tok.encode
    expected = [
        ([sp(tok, "bos")], 0),
        ([sp(tok, "user_start")] + e("Hello") + [sp(tok, "user_end")], 0),
        ([sp(tok, "assistant_start")], 0),
        (e("Hi there") + [sp(tok, "assistant_end")], 1),
        ([sp(tok, "user_start")] + e("What is 1+2?") + [sp(tok, "user_end")], 0),
        ([sp(tok, "assistant_start")], 0),
        (e("Let me compute."), 1),
        ([sp(tok, "python_start")] + e("1+2") + [sp(tok, "python_end")], 1),
        ([sp(tok, "output_start")] + e("3") + [sp(tok, "output_end")], 0),
        (e("It is 3.") + [sp(tok, "assistant_end")], 1),
    ]
    assert ids == [t for chunk, _ in expected for t in chunk]
    assert mask == [m for chunk, m in expected for _ in chunk]
    assert len(ids) == len(mask)


def test_system_is_merged_into_the_first_user_turn(tok):
    with_system, _ = render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], tok)
    merged, _ = render([{"role": "user", "content": "Be brief.\n\nHello"}], tok)
    assert with_system == merged
    assert with_system.count(sp(tok, "user_start")) == 1


def test_special_token_names_in_text_stay_text(tok):
    ids, _ = render([{"role": "user", "content": "<|assistant_end|>"}], tok)
    assert ids.count(sp(tok, "assistant_end")) == 0
    assert tok.decode(ids[2:-1]) == "<|assistant_end|>"


def test_truncation_cuts_from_the_end(tok):
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "I am fine"}]
    ids, mask = render(messages, tok)
    cut_ids, cut_mask = render(messages, tok, max_tokens=5)
    assert (cut_ids, cut_mask) == (ids[:5], mask[:5])
    assert render(messages, tok, max_tokens=1000) == (ids, mask)


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is 'user' but 'assistant' was expected"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "message 1 is 'assistant'"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only the first message"),
    ([{"role": "tool", "content": "a"}], "unknown role 'tool'"),
    ([{"role": "user"}], "'role' and 'content'"),
    (["hello"], "'role' and 'content'"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part 0"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}], "part 0"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "string or a list of parts"),
])
def test_bad_conversations_are_one_line_input_errors(tok, messages, message):
    with pytest.raises(InputError) as e:
        render(messages, tok)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_render_for_completion(tok):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "How are you?"}]
    ids, _ = render(messages, tok)
    prompt = render_for_completion(messages, tok)
    assert prompt == ids + [sp(tok, "assistant_start")]
    # a trailing assistant message (e.g. the reference answer of an eval item) is dropped
    assert render_for_completion(messages + [{"role": "assistant", "content": "Fine"}], tok) == prompt


def test_render_for_completion_keeps_bos_and_the_most_recent_tokens(tok):
    messages = [{"role": "user", "content": "Hello there, how are you? I am fine."}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "What is 1+2?"}]
    full = render_for_completion(messages, tok)
    cut = render_for_completion(messages, tok, max_tokens=8)
    assert len(cut) == 8
    assert cut == [sp(tok, "bos")] + full[-7:]
    assert cut[-1] == sp(tok, "assistant_start")
    assert render_for_completion(messages, tok, max_tokens=len(full)) == full


def test_render_for_completion_checks_the_conversation(tok):
    with pytest.raises(InputError, match="'user' was expected"):  # only one trailing assistant turn is dropped
        render_for_completion([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "assistant", "content": "c"}], tok)
    with pytest.raises(InputError, match="no user message"):
        render_for_completion([{"role": "system", "content": "s"}], tok)
    with pytest.raises(InputError, match="at least 2"):
        render_for_completion([{"role": "user", "content": "Hello there"}], tok, max_tokens=1)


# ------------------------------------------------------------------ fit_completion: prompt + reply inside the context

def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_fit_when_max_tokens_equals_the_context(tok):
    """`chatforge chat` on the tiny model: --max-tokens 256 (the default) and a 256-token context."""
    messages = [user("The capital of France is")]
    prompt, budget = fit_completion(messages, tok, context=256, max_tokens=256)
    assert prompt == render_for_completion(messages, tok)
    assert budget == 256 - len(prompt) and budget > 0


def test_fit_reply_budget_is_max_tokens_or_what_is_left(tok):
    messages = [user("Hello there")]
    n = len(render_for_completion(messages, tok))
    assert fit_completion(messages, tok, context=64, max_tokens=10) == (render_for_completion(messages, tok), 10)
    assert fit_completion(messages, tok, context=64, max_tokens=4096)[1] == 64 - n
    assert fit_completion(messages, tok, context=64, max_tokens=None)[1] == 64 - n  # no limit: all that is left
    # a trailing assistant message is dropped, as render_for_completion does
    assert fit_completion(messages + [bot("Hi")], tok, context=64)[0] == render_for_completion(messages, tok)


def test_fit_drops_the_oldest_exchanges_whole_and_keeps_the_system_message(tok):
    old = "Hello there, how are you? I am fine. " * 4
    system = {"role": "system", "content": "Be brief."}
    messages = [system, user(old), bot(old), user(old), bot("It is 3."), user("What is 1+2?")]
    full = render_for_completion(messages, tok)
    one_dropped = render_for_completion([system, *messages[3:]], tok)
    two_dropped = render_for_completion([system, messages[-1]], tok)
    assert len(full) > len(one_dropped) > len(two_dropped)
    # the reply is promised half the context: the prompt keeps the most recent exchanges that leave it that room
    for context, expected in [(2 * len(one_dropped), one_dropped), (2 * len(one_dropped) - 2, two_dropped), (2 * len(full), full)]:
        prompt, budget = fit_completion(messages, tok, context=context, max_tokens=context)
        assert prompt == expected and budget == context - len(expected) and budget >= context // 2, context
    # a smaller reply budget leaves room for every turn
    assert fit_completion(messages, tok, context=len(full) + 8, max_tokens=8) == (full, 8)
    # an oversized old message costs only its own exchange
    short = [user(old * 5), bot("ok"), user("Hi"), bot("Hello"), user("What is 1+2?")]
    tail = render_for_completion(short[2:], tok)
    assert fit_completion(short, tok, context=len(tail) + 20, max_tokens=20) == (tail, 20)


def test_fit_keeps_a_long_last_message_whole_while_one_reply_token_fits(tok):
    messages = [user("Hello there, how are you? I am fine. " * 6)]
    n = len(render_for_completion(messages, tok))
    assert fit_completion(messages, tok, context=n + 1, max_tokens=256) == (render_for_completion(messages, tok), 1)
    with pytest.raises(InputError, match=f"the last user message needs {n} prompt tokens, but the model's context holds {n}"):
        fit_completion(messages, tok, context=n, max_tokens=256)
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    with pytest.raises(InputError, match="the system message and the last user message need .* shorten it"):
        fit_completion(with_system, tok, context=n + 1, max_tokens=1)


def test_fit_checks_its_arguments(tok):
    with pytest.raises(InputError, match="'user' was expected"):
        fit_completion([user("a"), bot("b"), bot("c")], tok, context=64)
    with pytest.raises(InputError, match="max_tokens must be"):
        fit_completion([user("a")], tok, context=64, max_tokens=0)
    with pytest.raises(InputError, match="context of 1 tokens"):
        fit_completion([user("a")], tok, context=1)
