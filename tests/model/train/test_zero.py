"""The deepspeed engine (model/train/zero.py) on CPU with gloo: ZeRO 1, 2 and 3 with 2 processes give the torch
engine's losses with 1 process on the same global batch; the Muon/AdamW split, LRs, betas and momentum the optimizer
really uses each step; kill -9 and resume; two "nodes" on loopback; mid and sft; bad input before training."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

import test_mid as tm  # noqa: E402
import test_sft as ts  # noqa: E402
import test_train_base as tb  # noqa: E402
from helpers import free_port, kill_9_when# noqa: E402
from model.config import BaseConfig  # noqa: E402
from model.nn.optim import lr_multiplier, muon_momentum  # noqa: E402
from test_mid import mid_data  # noqa: E402,F401  (fixtures)
from test_sft import mid_checkpoint, sft_data  # noqa: E402,F401
from test_train_base import inputs  # noqa: E402,F401

ROOT = tb.ROOT
STEPS = 20


def config(**over) -> BaseConfig:
    return tb.small(num_iterations=STEPS, eval_every=10, sample_every=STEPS, grad_clip=0.0, **over)


def deepspeed(cfg, stage: int, nproc: int = 2):
    return cfg.model_copy(update={"engine": "deepspeed", "zero_config": f"zero{stage}", "nproc": nproc})


def losses(spec: Path) -> list[float]:
    return tb.curve(spec)["train"]["train_loss"]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):  # noqa: F811
    """The torch engine, one process: the losses and weights every deepspeed run must reproduce."""
    spec = tb.spec_file(tmp_path_factory.mktemp("torch-ref"), inputs, config(), "ref")
    r = tb.run_entry(spec)
    assert r.returncode == 0, r.stderr[-3000:]
    return spec


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_with_two_processes_matches_the_torch_engine(stage, reference, inputs, tmp_path):  # noqa: F811
    spec = tb.spec_file(tmp_path, inputs, deepspeed(config(), stage), f"zero{stage}")
    r = tb.run_entry(spec, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"engine deepspeed, ZeRO-{stage} (zero{stage}) on 2 process(es)" in r.stderr
    a, b = losses(reference), losses(spec)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    m = json.loads((spec.parent / "metrics.json").read_text())
    assert (m["engine"], m["zero_stage"], m["world_size"]) == ("deepspeed", stage, 2)
    # the committed artifact: the same consolidated fp32 safetensors, whichever engine trained it
    w1, w2 = load_file(str(reference.parent / "out" / "model.safetensors")), load_file(str(spec.parent / "out" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(w2[k].dtype == torch.float32 for k in w2)
    # within float rounding, relative to each tensor's scale; AdamW's eps of 1e-10 turns the rounding noise of a
    # row that almost no token touched into a full-size step, so its two tensors are looser than Muon's matrices
    for k in w1:
        rel = (w1[k] - w2[k]).abs().max().item() / w1[k].abs().max().item()
        assert rel < (5e-3 if k in ("embed.weight", "lm_head.weight") else 2e-4), (k, rel)
    assert len(json.loads((spec.parent / "out" / "samples.json").read_text())[-1]["samples"]) == 7


def test_split_lrs_betas_and_momentum_the_optimizer_uses_each_step():
    """DeepSpeed's Muon rule lands on the torch engine's Muon parameters, and each step the optimizer reads the
    scheduled LR of every group and the warmed-up momentum (ZeRO-3 included, which caches its Muon beta)."""
    env = {**tb.env(), "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/model/train/zero_probe.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    cfg = BaseConfig(depth=2, head_dim=32, max_seq_len=32, total_batch_size=256, device_batch_size=2, num_iterations=6,
                     muon_momentum_warmup=4, warmup_ratio=0.34, warmdown_ratio=0.34, final_lr_frac=0.1, grad_clip=0.0)
    for stage, got in found.items():
        groups = got["torch_groups"]
        muon = [g for g in groups if g["muon"]]
        assert got["split"] == muon[0]["params"] and len(muon) == 1, stage
        assert [g["params"] for g in groups if not g["muon"]] == [["embed.weight"], ["lm_head.weight"]]
        scale = (2 * 64 / 768) ** -0.5  # width = depth × aspect_ratio; the AdamW rates carry (width/768)^-0.5
        initial = {"adam0-adam-params": cfg.embedding_lr * scale, "adam1-adam-params": cfg.unembedding_lr * scale,
                   "muon0-muon-params": cfg.matrix_lr}
        assert [g["initial_lr"] for g in groups] == pytest.approx(list(initial.values()))
        assert got["ns_method"] == "gram"  # fp32 on a CPU without fp16 matrix units
        for i, used in enumerate(got["steps"]):
            mult, mom = lr_multiplier(i, 6, cfg), muon_momentum(i, cfg)
            assert used["muon_beta"] == [pytest.approx(mom)], (stage, i)
            assert set(used["groups"]) == set(initial), (stage, i)
            for name, g in used["groups"].items():
                assert g["lr"] == pytest.approx(initial[name] * mult), (stage, i, name)
                if name.startswith("adam"):
                    assert g["betas"] == list(cfg.adam_betas)
                else:
                    assert g["momentum"] == pytest.approx(mom)
        assert len({round(u["muon_beta"][0], 9) for u in got["steps"]}) == 5  # the warmup really moved it


def test_kill_9_and_resume_equals_uninterrupted_and_another_count_is_refused(reference, inputs, tmp_path):  # noqa: F811
    cfg = deepspeed(config(checkpoint_every=5), 3)
    spec = tb.spec_file(tmp_path, inputs, cfg, "resumed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model.train.base", str(spec)]
    proc = subprocess.Popen(cmd, env=tb.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wip = spec.parent / "wip"
    kill_9_when(wip / "step-00000010", proc)
    assert not (spec.parent / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in (wip / "step-00000010" / "deepspeed").iterdir()) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    r = tb.run_entry(spec, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step-000000" in r.stderr
    # within float rounding of the uninterrupted runs, but not bitwise as the torch engine's resume is: from the second
    # step after a resume the losses differ in the 7th digit (every ZeRO stage, 2 processes; two uninterrupted
    # deepspeed runs are bitwise equal, and a 2-process resume driven in-process through model/train/engine.py is exact)
    assert tb.curve(spec)["train"]["step"] == list(range(1, STEPS + 1))
    assert max(abs(x - y) for x, y in zip(losses(reference), losses(spec))) <= 1e-5
    # ZeRO partitions are per rank: one process cannot resume them, and says what can
    (spec.parent / "out" / "model.safetensors").unlink()
    r = tb.run_entry(tb.spec_file(tmp_path, inputs, cfg.model_copy(update={"nproc": 1}), "resumed"))
    assert r.returncode == 1
    assert "holds ZeRO-3 partitions of 2 process(es); this run is ZeRO-3 on 1: resume with the same process count" in r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_checkpoints_on_every_rank_at_the_same_step_and_resumes(inputs, tmp_path):  # noqa: F811
    cfg = deepspeed(tb.small(num_iterations=400, eval_every=1000, sample_every=1000, grad_clip=0.0), 2)
    spec = tb.spec_file(tmp_path, inputs, cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "model.train.base", str(spec)]
    proc = subprocess.Popen(cmd, env=tb.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "val bpb" not in seen:  # training has started: the handlers are installed
        line = proc.stderr.readline()
        assert line, f"exited early: {seen[-2000:]}"
        seen += line
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to its workers
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    ckpt = sorted((spec.parent / "wip").glob("step-*"))[-1]
    step = int(ckpt.name.split("-")[1])
    assert 0 < step < 400 and f"SIGTERM: checkpoint at step {step}" in err, err[-2000:]
    assert len(list((ckpt / "deepspeed").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    raw = json.loads(spec.read_text())
    raw["config"]["num_iterations"] = step + 2
    spec.write_text(json.dumps(raw))
    r = tb.run_entry(spec, nproc=2)
    assert r.returncode == 0 and f"resuming from {ckpt.name}" in r.stderr, r.stderr[-3000:]
    assert tb.curve(spec)["train"]["step"] == list(range(1, step + 3))


def test_two_nodes_on_loopback_match_one_node(reference, inputs, tmp_path):  # noqa: F811
    """The no-ssh multi-node form: one launcher per node, each with its node rank and the same fixed master."""
    spec = tb.spec_file(tmp_path, inputs, deepspeed(config(), 2, nproc=1), "nodes")
    port = free_port()
    launchers = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                          "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                          "-m", "model.train.base", str(spec)],
                         env=tb.env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    results = [p.communicate(timeout=600) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert json.loads((spec.parent / "metrics.json").read_text())["world_size"] == 2
    assert max(abs(x - y) for x, y in zip(losses(reference), losses(spec))) <= 1e-5


def test_mid_and_sft_under_zero2_match_the_torch_engine(tiny_checkpoint, mid_data, mid_checkpoint, sft_data, tmp_path):  # noqa: F811
    cases = [(tm, tiny_checkpoint, mid_data, tm.small(num_iterations=6)), (ts, mid_checkpoint, sft_data, ts.small(num_iterations=6))]
    for mod, ckpt, data, cfg in cases:
        one = mod.spec_file(tmp_path / mod.__name__, ckpt, data, cfg, "torch")
        two = mod.spec_file(tmp_path / mod.__name__, ckpt, data,
                            cfg.model_copy(update={"engine": "deepspeed", "zero_config": "zero2", "nproc": 2}), "zero2")
        r1, r2 = mod.run_entry(one), mod.run_entry(two, nproc=2)
        assert r1.returncode == 0, r1.stderr[-3000:]
        assert r2.returncode == 0, r2.stderr[-3000:]
        a, b = mod.curve(one)["train"]["train_loss"], mod.curve(two)["train"]["train_loss"]
        assert len(a) == len(b) == 6
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (mod.__name__, a, b)


@pytest.mark.parametrize("write, over, message", [
    ("{not json", {}, "is not valid JSON"),
    ('{"zero_optimization": {"stage": 3, "reduce_scatter": true}}', {}, "ZeRO-3 with reduce_scatter on"),
    ('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}', {}, "sets optimizer, which chatforge sets"),
    ('{"zero_optimization": {"stage": 4}}', {}, 'needs "zero_optimization": {"stage": 1, 2 or 3'),
    (None, {"grad_clip": 1.0}, "base.grad_clip=1.0 with base.engine=deepspeed"),
    (None, {"zero_config": "/nonexistent/zero.json"}, "base.zero_config: cannot read /nonexistent/zero.json"),
])
def test_bad_zero_input_is_one_line_before_training(write, over, message, inputs, tmp_path):  # noqa: F811
    cfg = deepspeed(config(), 2, nproc=1)
    if write is not None:
        (tmp_path / "zero.json").write_text(write)
        cfg = cfg.model_copy(update={"zero_config": str(tmp_path / "zero.json")})
    r = tb.run_entry(tb.spec_file(tmp_path, inputs, cfg.model_copy(update=over)))
    assert r.returncode == 1 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "step 0" not in r.stderr
    assert not (tmp_path / "run" / "wip").exists()


def test_a_world_size_that_does_not_divide_the_streams_stops_before_training(inputs, tmp_path):  # noqa: F811
    spec = tb.spec_file(tmp_path, inputs, deepspeed(config(), 2, nproc=3))  # 2 streams, 3 processes
    r = tb.run_entry(spec, nproc=3)
    assert r.returncode != 0
    assert "is not a multiple of device_batch_size × max_seq_len × nproc" in r.stderr
    assert "step 0" not in r.stderr and not (spec.parent / "wip").exists()
