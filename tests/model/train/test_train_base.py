"""Base pretraining end to end on CPU: learning, exact resume after kill -9, 2 processes = 1 process,
and bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import kill_9_when, train_inputs
from model.config import BaseConfig, TokenizerConfig
from model.data.tokenizer import train as train_tokenizer

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return train_inputs(tmp_path_factory.mktemp("base-inputs"), docs=3000)


def small(**over) -> BaseConfig:
    base = dict(depth=2, head_dim=32, max_seq_len=64, device_batch_size=4, total_batch_size=512, num_iterations=12,
                eval_every=6, eval_tokens=2048, sample_every=12, sample_tokens=4, checkpoint_every=1000,
                muon_momentum_warmup=5, loader_threads=1)
    return BaseConfig(**{**base, **over})


def spec_file(tmp: Path, inputs, cfg: BaseConfig, name: str = "run") -> Path:
    d = tmp / name
    (d / "out").mkdir(parents=True, exist_ok=True)
    spec = {"config": cfg.model_dump(mode="json"), "dataset_dir": str(inputs[0]), "tokenizer_dir": str(inputs[1]),
            "out_dir": str(d / "out"), "wip_dir": str(d / "wip"), "metrics_path": str(d / "metrics.json")}
    path = d / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def env(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def run_entry(spec: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "model.train.base", str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "model.train.base", str(spec)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600, cwd=ROOT)


def curve(spec: Path) -> dict:
    return json.loads((spec.parent / "out" / "curve.json").read_text())


def test_trains_and_val_bpb_falls(inputs, tmp_path):
    spec = spec_file(tmp_path, inputs, small(num_iterations=60, eval_every=20))
    r = run_entry(spec)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((spec.parent / "metrics.json").read_text())
    val = [e["val_bpb"] for e in curve(spec)["val"]]
    assert [e["step"] for e in curve(spec)["val"]] == [0, 20, 40, 60]
    assert val[-1] < 0.8 * val[0], val
    assert m["steps"] == 60 and m["tokens"] == 60 * 512 and m["streams"] == 2 and m["world_size"] == 1
    assert m["flops_per_token"] > 0 and m["tokens_per_s"] > 0 and m["mfu"] is None  # no MFU without a known peak
    out = spec.parent / "out"
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "model.json", "model.safetensors", "samples.json", "tokenizer"]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["token_bytes.safetensors", "tokenizer.json"]
    samples = json.loads((out / "samples.json").read_text())
    assert samples[-1]["step"] == 60 and len(samples[-1]["samples"]) == 7


def test_resume_after_kill_9_equals_uninterrupted(inputs, tmp_path):
    cfg = small(num_iterations=40, checkpoint_every=10, eval_every=20)
    straight = spec_file(tmp_path, inputs, cfg, "straight")
    assert run_entry(straight).returncode == 0
    resumed = spec_file(tmp_path, inputs, cfg, "resumed")
    proc = subprocess.Popen([sys.executable, "-m", "model.train.base", str(resumed)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wip = resumed.parent / "wip"
    kill_9_when(wip / "step-00000020", proc)
    assert not (resumed.parent / "out" / "model.safetensors").exists()
    r = run_entry(resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step-000000" in r.stderr
    assert "compile: off (est." in r.stderr and "over 40 steps" in r.stderr  # the planned total decides, not the steps left
    a, b = curve(straight), curve(resumed)
    assert a["train"]["step"] == b["train"]["step"] == list(range(1, 41))
    assert a["train"]["train_loss"] == b["train"]["train_loss"]  # the same loss at every step, exactly
    assert a["val"] == b["val"]
    assert (straight.parent / "out" / "model.safetensors").read_bytes() == (resumed.parent / "out" / "model.safetensors").read_bytes()


def test_sigterm_writes_a_checkpoint_and_resumes(inputs, tmp_path):
    cfg = small(num_iterations=400, eval_every=1000)
    spec = spec_file(tmp_path, inputs, cfg)
    proc = subprocess.Popen([sys.executable, "-m", "model.train.base", str(spec)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "val bpb" not in seen:  # training has started: the handler is installed
        line = proc.stderr.readline()
        assert line, f"exited early: {seen[-2000:]}"
        seen += line
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    ckpt = sorted((spec.parent / "wip").glob("step-*"))[-1]
    step = int(ckpt.name.split("-")[1])
    assert 0 < step < 400 and f"SIGTERM: checkpoint at step {step}" in err
    raw = json.loads(spec.read_text())
    raw["config"]["num_iterations"] = step + 2
    spec.write_text(json.dumps(raw))
    r = run_entry(spec)
    assert r.returncode == 0 and f"resuming from {ckpt.name}" in r.stderr
    assert curve(spec)["train"]["step"] == list(range(1, step + 3))


def test_two_processes_match_one_on_the_same_global_batch(inputs, tmp_path):
    cfg = small(num_iterations=4, eval_every=4, sample_every=1000)
    one = spec_file(tmp_path, inputs, cfg, "one")
    two = spec_file(tmp_path, inputs, cfg.model_copy(update={"nproc": 2}), "two")
    r1, r2 = run_entry(one), run_entry(two, nproc=2)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1, l2 = curve(one)["train"]["train_loss"], curve(two)["train"]["train_loss"]
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-5, (l1, l2)
    assert json.loads((two.parent / "metrics.json").read_text())["world_size"] == 2
    w1, w2 = load_file(str(one.parent / "out" / "model.safetensors")), load_file(str(two.parent / "out" / "model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def test_resume_with_another_process_count_continues(inputs, tmp_path):
    """The data a step sees does not depend on nproc, so a checkpoint from 1 process resumes under 2."""
    cfg = small(num_iterations=8, checkpoint_every=4, eval_every=8, sample_every=1000)
    straight = spec_file(tmp_path, inputs, cfg, "straight")
    assert run_entry(straight).returncode == 0
    mixed = spec_file(tmp_path, inputs, cfg.model_copy(update={"num_iterations": 4}), "mixed")
    assert run_entry(mixed).returncode == 0
    shutil.rmtree(mixed.parent / "out")
    (mixed.parent / "out").mkdir()
    spec = json.loads(mixed.read_text())
    spec["config"]["num_iterations"] = 8
    mixed.write_text(json.dumps(spec))
    r = run_entry(mixed, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = curve(straight)["train"]["train_loss"], curve(mixed)["train"]["train_loss"]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


@pytest.mark.parametrize("over, message", [
    ({"depth": 0}, "depth"),
    ({"total_batch_size": 500}, "is not a multiple of device_batch_size × max_seq_len × nproc"),
])
def test_bad_config_is_one_line(over, message, inputs, tmp_path):
    cfg = small().model_dump()
    cfg.update(over)
    spec = spec_file(tmp_path, inputs, small())
    raw = json.loads(spec.read_text())
    raw["config"] = cfg
    spec.write_text(json.dumps(raw))
    r = run_entry(spec)
    assert r.returncode == 1
    assert message in r.stderr.strip().splitlines()[-1]


def test_corrupt_checkpoint_and_mismatched_tokenizer_are_clear_errors(inputs, tmp_path):
    cfg = small(num_iterations=4, checkpoint_every=2, eval_every=4)
    spec = spec_file(tmp_path, inputs, cfg)
    proc = subprocess.run([sys.executable, "-m", "model.train.base", str(spec)], env=env(), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    wip = spec.parent / "wip"
    newest = sorted(wip.glob("step-*"))[-1]
    # a longer run resumes from the newest checkpoint: corrupt it first
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    raw = json.loads(spec.read_text())
    raw["config"]["num_iterations"] = 6
    spec.write_text(json.dumps(raw))
    r = run_entry(spec)
    assert r.returncode == 1 and "is corrupt or unreadable" in r.stderr.strip().splitlines()[-1]

    shutil.rmtree(newest)  # the older checkpoint is intact, but the tokenizer now has another vocab
    other_tok = tmp_path / "tok2"
    other_tok.mkdir()
    train_tokenizer(TokenizerConfig(vocab_size=600, reference_encodings=[]), inputs[0], other_tok, download_dir=None)
    raw["tokenizer_dir"] = str(other_tok)
    spec.write_text(json.dumps(raw))
    r = run_entry(spec)
    assert r.returncode == 1 and "another model" in r.stderr.strip().splitlines()[-1]
