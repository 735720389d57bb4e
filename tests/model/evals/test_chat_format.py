"""The chat-format probes: which replies end their turn, which calculator calls are well formed."""
from __future__ import annotations

from model.evals import chat_format as cf


def test_well_formed_calls_need_an_expression_the_calculator_evaluates():
    text = ("First <|python_start|>12+15<|python_end|><|output_start|>27<|output_end|> then "
            "<|python_start|>196*(13*(3<|python_end|> and <|python_start|>import os<|python_end|> "
            "<|python_start|>24 * 7<|python_end|>")
    assert cf.well_formed_calls(text) == ["12+15", "24 * 7"]
    assert cf.well_formed_calls("no call, #### 27") == []
    assert cf.well_formed_calls("<|python_start|>1+1 never closed") == []


class _Tok:
    """Token ids stand for themselves; 2 is <|assistant_end|>, 3/4 are the python delimiters."""
    names = {"<|assistant_end|>": 2, "<|python_start|>": 3, "<|python_end|>": 4}

    def special_id(self, name):
        return self.names.get(name, 9)

    def decode(self, ids):
        inv = {v: k for k, v in self.names.items()}
        return "".join(inv.get(i, "7") for i in ids)


class _Engine:
    """Replies in turn from `script`, recording the requests."""

    def __init__(self, script):
        self.script, self.calls = script, []
        self.model = type("M", (), {"config": type("C", (), {"sequence_len": 64})()})()

    def generate_batch(self, prompts, max_tokens, temperature=1.0, top_k=None, seed=42, num_samples=1):
        self.calls.append((len(prompts), max_tokens, temperature, num_samples))
        rows = len(prompts) * num_samples
        return [(self.script[i % len(self.script)], []) for i in range(rows)]


def test_turn_end_rate_counts_replies_closed_by_assistant_end(monkeypatch):
    monkeypatch.setattr(cf, "render_for_completion", lambda messages, tok, max_tokens=None: [0, 1])
    engine = _Engine([[5, 6, 2], [5, 5, 5], [2], [6]])
    assert cf.turn_end_rate(engine, _Tok(), 16) == 0.5
    assert engine.calls == [(32, 16, 0.0, 1)]  # greedy, all 32 prompts


def test_calculator_call_rate_counts_sampled_replies_with_a_call(monkeypatch):
    monkeypatch.setattr(cf, "render_for_completion", lambda messages, tok, max_tokens=None: [0, 1])
    monkeypatch.setattr(cf.calculator, "evaluate", lambda expr: "14" if expr == "77" else None)
    engine = _Engine([[3, 7, 7, 4, 2], [7, 2], [3, 4], [7]])  # "77" evaluates; an empty call does not
    assert cf.calculator_call_rate(engine, _Tok(), 16) == 0.25
    assert engine.calls == [(8, 16, 1.0, 4)]
    assert len(cf.TURN_PROMPTS) == 32 and len(cf.CALC_PROMPTS) * 4 == 32
