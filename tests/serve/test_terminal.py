"""`chatforge chat` (serve/terminal.py): the prompt and the reply share the model's context."""
from __future__ import annotations

import io

import pytest

from model.errors import InputError
from serve.terminal import chat


def test_one_question_when_max_tokens_is_the_whole_context(tiny_checkpoint, capsys):
    """The tiny checkpoint's context is 64 tokens: --max-tokens 64 leaves the reply what the prompt does not use."""
    out = io.StringIO()
    assert chat(tiny_checkpoint, "Doc 1:", temperature=0, top_k=None, max_tokens=64, out=out) == 0
    assert out.getvalue().endswith("\n")
    assert "first token after" in capsys.readouterr().err


def test_a_question_longer_than_the_context_is_one_clear_error(tiny_checkpoint):
    with pytest.raises(InputError, match="the last user message needs .* tokens, but the model's context holds 64"):
        chat(tiny_checkpoint, "word " * 200, temperature=0, top_k=None, max_tokens=8, out=io.StringIO())


def test_interactive_chat_says_so_and_goes_on(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("word " * 200 + "\nDoc 2:\nquit\n"))
    out = io.StringIO()
    assert chat(tiny_checkpoint, None, temperature=0, top_k=None, max_tokens=64, out=out) == 0
    err = capsys.readouterr().err
    assert "chatforge: error: the last user message needs" in err
    assert out.getvalue().count("bot> ") == 1  # the long message got no reply, the next one did
