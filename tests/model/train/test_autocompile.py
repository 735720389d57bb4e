"""The compile decision: explicit settings win, short runs stay eager, long runs compile (that a resume decides
from the planned total: tests/model/train/test_train_base.py)."""
from __future__ import annotations

from model.train import autocompile

D2 = dict(n_layer=2, flops_per_token=7_000_000, tokens_per_step=4096)


def test_explicit_setting_wins_both_ways():
    assert autocompile.plan(True, "cpu", 1, steps=1, **D2).on
    assert not autocompile.plan(False, "cuda", 1, steps=10**6, **D2).on
    assert "set in the config" in autocompile.plan(False, "cpu", 1, steps=5, **D2).line()


def test_short_runs_stay_eager_and_long_runs_compile():
    short = autocompile.plan(None, "cpu", 1, steps=60, **D2)  # the tests' tiny runs
    long = autocompile.plan(None, "cpu", 1, steps=100_000, **D2)
    assert not short.on and long.on
    assert short.line().startswith("compile: off (est.") and "does not pay back" in short.line()
    assert long.line().startswith("compile: on (est.") and "over 100000 steps" in long.line()


def test_without_a_step_count_only_cuda_compiles():
    assert autocompile.plan(None, "cuda", 1, steps=None, **D2).on
    assert not autocompile.plan(None, "cpu", 1, steps=None, **D2).on
