"""The `sft` stage end to end on CPU: padded rows with masked targets, the LR the optimizer applies, exact
resume after kill -9 and after SIGTERM, 2 processes = 1 process, and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chat_data import arithmetic, write_conversations
from helpers import kill_9_when
from model.config import MidConfig, SftConfig
from model.data.chat_loader import Conversations
from model.chat.conversation import render
from model.nn.load import load_model
from model.train import common, finetune, mid, sft

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def sigterm_restored():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture(scope="module")
def mid_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny base checkpoint mid-trained for a few steps (in this process): what sft starts from."""
    before, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mid")
    data = write_conversations(root / "data", arithmetic(100, seed=5, turns=2), arithmetic(10, seed=6))
    (root / "out").mkdir()
    cfg = MidConfig(total_batch_size=512, device_batch_size=4, num_iterations=6, eval_every=6, eval_tokens=512, device="cpu")
    mid.train({"config": cfg.model_dump(mode="json"), "checkpoint_dir": str(tiny_checkpoint), "data_dir": str(data),
               "out_dir": str(root / "out"), "wip_dir": str(root / "wip")})
    signal.signal(signal.SIGTERM, before)
    torch.set_num_threads(threads)
    return root / "out"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    long_user = [[{"role": "user", "content": "What is this? " * 40}, {"role": "assistant", "content": "I do not know."}]]
    return write_conversations(tmp_path_factory.mktemp("sft-data"), arithmetic(62, seed=3) + long_user * 2, arithmetic(12, seed=4))


def small(**over) -> SftConfig:
    base = dict(examples_per_step=8, device_batch_size=2, eval_every=4, eval_examples=12, checkpoint_every=1000, device="cpu")
    return SftConfig(**{**base, **over})


def spec_file(tmp: Path, ckpt: Path, data: Path, cfg: SftConfig, name: str = "run") -> Path:
    d = tmp / name
    (d / "out").mkdir(parents=True, exist_ok=True)
    spec = {"config": cfg.model_dump(mode="json"), "checkpoint_dir": str(ckpt), "data_dir": str(data),
            "out_dir": str(d / "out"), "wip_dir": str(d / "wip"), "metrics_path": str(d / "metrics.json")}
    path = d / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_entry(spec: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "model.train.sft", str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "model.train.sft", str(spec)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600, cwd=ROOT)


def curve(spec: Path) -> dict:
    return json.loads((spec.parent / "out" / "curve.json").read_text())


def test_trains_on_assistant_tokens_and_val_loss_falls(mid_checkpoint, sft_data, tmp_path):
    spec = spec_file(tmp_path, mid_checkpoint, sft_data, small(num_epochs=3, init_lr_frac=0.2))
    r = run_entry(spec)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((spec.parent / "metrics.json").read_text())
    assert m["steps"] == 3 * (64 // 8) == 24 and m["examples"] == 24 * 8 and m["epochs"] == 3.0
    assert m["streams"] == 4 and m["world_size"] == 1
    c = curve(spec)
    assert [e["step"] for e in c["val"]] == list(range(0, 25, 4))
    assert m["val_loss"] < 0.85 * m["first_val_loss"], c["val"]
    assert all(l == l for l in c["train"]["train_loss"])  # no NaN, though the long conversations count no target
    # tokens: the non-pad input tokens of every conversation of the 24 steps (8 per epoch, reshuffled)
    _, tok = load_model(mid_checkpoint)
    convs = Conversations(sft_data, "train")
    lengths = [len(render(convs.messages(i), tok, max_tokens=65)[0]) - 1 for i in range(64)]
    import numpy as np
    expect = sum(sum(lengths[i] for i in np.random.default_rng([42, e]).permutation(64)[:64]) for e in range(3))
    assert m["tokens"] == sum(c["train"]["tokens"]) == expect
    assert m["tokens_per_s"] > 0 and m["device_type"] == "cpu"
    out = spec.parent / "out"
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "model.json", "model.safetensors", "samples.json", "tokenizer"]
    assert common.checkpoint_stage(out) == "sft"
    common.load_start(out, "rl", "cpu")  # what rl starts from


def test_lr_decays_linearly_to_zero_in_the_optimizer(mid_checkpoint, sft_data, tmp_path, monkeypatch, sigterm_restored):
    applied = []
    real_step = sft.common.optimizer_step

    def spy(model, optimizers, grad_clip, rt):
        applied.append([[(g["lr"], g.get("momentum")) for g in opt.param_groups] for opt in optimizers])
        return real_step(model, optimizers, grad_clip, rt)

    monkeypatch.setattr(sft.common, "optimizer_step", spy)
    metrics = sft.train(json.loads(spec_file(tmp_path, mid_checkpoint, sft_data, small(num_iterations=5, eval_every=100)).read_text()))
    assert metrics["steps"] == 5 and len(applied) == 5
    scale = (128 / 768) ** -0.5
    for step, (adam, muon) in enumerate(applied):
        m = 0.02 * (1 - step / 5)
        assert adam[0][0] == pytest.approx(0.2 * scale * m) and adam[1][0] == pytest.approx(0.004 * scale * m)
        assert muon[0] == (pytest.approx(0.02 * m), 0.95)


def test_a_micro_batch_with_no_counted_target_adds_nothing():
    x = torch.tensor([[1, 2, 3]])
    fwd = lambda x, y, loss_reduction: torch.ones(y.shape, requires_grad=True) * (y >= 0)
    assert finetune.mean_loss(fwd, x, torch.tensor([[-1, -1, -1]])).item() == 0.0
    assert finetune.mean_loss(fwd, x, torch.tensor([[-1, 5, 6]])).item() == 1.0


def test_resume_after_kill_9_equals_uninterrupted(mid_checkpoint, sft_data, tmp_path):
    cfg = small(num_iterations=24, checkpoint_every=10, eval_every=12)  # crosses two epoch boundaries
    straight = spec_file(tmp_path, mid_checkpoint, sft_data, cfg, "straight")
    assert run_entry(straight).returncode == 0
    resumed = spec_file(tmp_path, mid_checkpoint, sft_data, cfg, "resumed")
    proc = subprocess.Popen([sys.executable, "-m", "model.train.sft", str(resumed)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wip = resumed.parent / "wip"
    kill_9_when(wip / "step-00000010", proc)
    assert not (resumed.parent / "out" / "model.safetensors").exists()
    r = run_entry(resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft: resuming from step-000000" in r.stderr
    a, b = curve(straight), curve(resumed)
    assert a["train"]["step"] == b["train"]["step"] == list(range(1, 25))
    assert a["train"]["train_loss"] == b["train"]["train_loss"] and a["train"]["tokens"] == b["train"]["tokens"]
    assert a["val"] == b["val"]
    assert (straight.parent / "out" / "model.safetensors").read_bytes() == (resumed.parent / "out" / "model.safetensors").read_bytes()


def test_sigterm_writes_a_checkpoint_and_resumes(mid_checkpoint, sft_data, tmp_path):
    spec = spec_file(tmp_path, mid_checkpoint, sft_data, small(num_iterations=2000, eval_every=5000))
    proc = subprocess.Popen([sys.executable, "-m", "model.train.sft", str(spec)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "val loss" not in seen:  # training has started: the handler is installed
        line = proc.stderr.readline()
        assert line, f"exited early: {seen[-2000:]}"
        seen += line
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    ckpt = sorted((spec.parent / "wip").glob("step-*"))[-1]
    step = int(ckpt.name.split("-")[1])
    assert 0 < step < 2000 and f"SIGTERM: checkpoint at step {step}" in err
    raw = json.loads(spec.read_text())
    raw["config"]["num_iterations"] = step + 2
    spec.write_text(json.dumps(raw))
    r = run_entry(spec)
    assert r.returncode == 0 and f"resuming from {ckpt.name}" in r.stderr, r.stderr[-2000:]
    assert curve(spec)["train"]["step"] == list(range(1, step + 3))


def test_two_processes_match_one_on_the_same_global_batch(mid_checkpoint, sft_data, tmp_path):
    cfg = small(num_iterations=3, eval_every=3)
    one = spec_file(tmp_path, mid_checkpoint, sft_data, cfg, "one")
    two = spec_file(tmp_path, mid_checkpoint, sft_data, cfg.model_copy(update={"nproc": 2}), "two")
    r1, r2 = run_entry(one), run_entry(two, nproc=2)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = curve(one), curve(two)
    assert max(abs(x - y) for x, y in zip(a["train"]["train_loss"], b["train"]["train_loss"])) <= 1e-5
    assert a["train"]["tokens"] == b["train"]["tokens"]
    assert max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(a["val"], b["val"])) <= 1e-5


def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_checkpoint, mid_checkpoint, sft_data, tmp_path, capsys,
                                                          sigterm_restored):
    empty = write_conversations(tmp_path / "empty", [], arithmetic(3))
    cases = [
        (tiny_checkpoint, sft_data, small(), "sft starts from a mid checkpoint, but"),
        (tiny_checkpoint.parent / "tok", sft_data, small(), "is not a checkpoint artifact (no model.json): sft starts from a mid"),
        (mid_checkpoint, empty, small(), "the train split of"),
        (mid_checkpoint, sft_data, small(examples_per_step=128, device_batch_size=4), "fewer than the 128 of one step"),
        (mid_checkpoint, sft_data, small(examples_per_step=9), "sft.examples_per_step 9 / device_batch_size 2 must be"),
    ]
    for i, (ckpt, data, cfg, message) in enumerate(cases):
        spec = spec_file(tmp_path, ckpt, data, cfg, f"case{i}")
        assert sft.main([str(spec)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sft: error: ") and message in err[0], err
        assert list((spec.parent / "out").iterdir()) == [] and not (spec.parent / "wip").exists()
