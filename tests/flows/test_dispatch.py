"""`execution`: which stages go to the GPU pool, what is checked before a run starts, and that where a stage runs
is never part of its key. (The pools themselves, with real workers, are tests/flows/test_pools.py.)"""
from __future__ import annotations

import pytest

from flows import dispatch
from flows.overrides import ConfigError, build_config
from model.errors import InputError
from tasks.registry import STAGES, get
from tasks.stage import plan


def test_gpu_stages_follow_each_stages_device():
    cfg = build_config("tiny", ["execution.pools=true"])
    assert [s.name for s in STAGES if dispatch.needs_gpu(s, cfg)] == ["base", "mid", "sft", "rl"]
    # a device asked for explicitly wins: evals on cuda go, training pinned to cpu stays
    cfg = build_config("tiny", ["execution.pools=true", "chat_eval.device=cuda", "base_eval.device=cuda", "rl.device=cpu"])
    assert [s.name for s in STAGES if dispatch.needs_gpu(s, cfg)] == [
        "base", "base_eval", "chat_eval_base", "mid", "chat_eval_mid", "sft", "chat_eval_sft", "chat_eval_rl"]
    # or the list, as given
    cfg = build_config("tiny", ['execution.gpu_stages=["tokenizer","base"]'])
    assert [s.name for s in STAGES if dispatch.needs_gpu(s, cfg)] == ["tokenizer", "base"]
    assert not any(dispatch.needs_gpu(s, build_config("tiny", ["execution.gpu_stages=[]"])) for s in STAGES)


def test_where_a_stage_runs_is_in_no_key():
    plain = plan(STAGES, build_config("tiny"))
    spread = plan(STAGES, build_config("tiny", ['execution.pools={"cpu":"a","gpu":"b"}', 'execution.gpu_stages=["data"]',
                                                "execution.lease_seconds=5", "execution.stage_deployment=x/y"]))
    assert spread == plain


def test_pool_names():
    assert build_config("tiny").execution.pool_names() is None
    assert build_config("tiny", ["execution.pools=false"]).execution.pool_names() is None
    pools = build_config("tiny", ["execution.pools=true"]).execution.pool_names()
    assert (pools.cpu, pools.gpu) == ("chatforge-cpu", "chatforge-gpu")
    pools = build_config("tiny", ['execution.pools={"gpu":"a100"}']).execution.pool_names()
    assert (pools.cpu, pools.gpu) == ("chatforge-cpu", "a100")


@pytest.mark.parametrize("bad, said", [
    ("execution.stage_deployment=no-slash", "bad value for execution.stage_deployment"),
    ("execution.lease_seconds=0", "bad value for execution.lease_seconds"),
    ('execution.pools={"gpu":""}', "bad value for execution.pools"),
])
def test_bad_execution_settings_are_one_line_errors(bad, said):
    with pytest.raises(ConfigError) as e:
        build_config("tiny", [bad])
    assert str(e.value).startswith(said) and "\n" not in str(e.value)


def test_checked_before_any_work(monkeypatch):
    cfg = build_config("tiny", ['execution.gpu_stages=["base","bsae"]'])
    with pytest.raises(InputError, match=r"execution.gpu_stages names unknown stage\(s\) 'bsae': the stages are data, "):
        dispatch.check(cfg, STAGES, STAGES)
    # pools need a Prefect API that workers poll: a temporary server only this process sees has no workers
    monkeypatch.setattr("tasks.locks.prefect_api", lambda: None)
    with pytest.raises(InputError, match="execution.pools is on but no Prefect API is configured.*chatforge server"):
        dispatch.check(build_config("tiny", ["execution.pools=true"]), [get("data")], STAGES)
    assert dispatch.check(build_config("tiny"), STAGES, STAGES) is None  # no pools: nothing to ask anyone
