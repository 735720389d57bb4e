"""The `mid` stage end to end on CPU: packed conversations, the LR schedule the optimizer applies, mask_loss,
exact resume after kill -9, 2 processes = 1 process, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from chat_data import arithmetic, write_conversations
from helpers import kill_9_when
from model.config import MidConfig
from model.data.chat_loader import Conversations
from model.chat.conversation import render
from model.nn.load import load_model
from model.train import common, mid
from tasks.launch import CHECKPOINT_FILES

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def mid_data(tmp_path_factory) -> Path:
    return write_conversations(tmp_path_factory.mktemp("mid-data"), arithmetic(300, seed=0, turns=2), arithmetic(30, seed=1))


@pytest.fixture
def sigterm_restored():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def small(**over) -> MidConfig:
    base = dict(total_batch_size=512, device_batch_size=4, num_iterations=8, eval_every=4, eval_tokens=1024,
                checkpoint_every=1000, muon_momentum_warmup=5, device="cpu")
    return MidConfig(**{**base, **over})


def spec_file(tmp: Path, ckpt: Path, data: Path, cfg: MidConfig, name: str = "run") -> Path:
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
        cmd = [sys.executable, "-m", "model.train.mid", str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "model.train.mid", str(spec)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600, cwd=ROOT)


def curve(spec: Path) -> dict:
    return json.loads((spec.parent / "out" / "curve.json").read_text())


def test_one_epoch_learns_the_chat_format(tiny_checkpoint, mid_data, tmp_path):
    spec = spec_file(tmp_path, tiny_checkpoint, mid_data, small(num_iterations=None, eval_every=10))
    r = run_entry(spec)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((spec.parent / "metrics.json").read_text())
    _, tok = load_model(tiny_checkpoint)
    rendered = sum(len(render(Conversations(mid_data, "train").messages(i), tok)[0]) for i in range(300))
    assert m["epoch_tokens"] == rendered and m["steps"] == rendered // 512 >= 20  # one epoch of the train split
    assert m["tokens"] == m["steps"] * 512 and m["streams"] == 2 and m["world_size"] == 1 and m["sequence_len"] == 64
    c = curve(spec)
    assert [e["step"] for e in c["val"]] == sorted({*range(0, m["steps"], 10), m["steps"]})
    assert m["val_loss"] < 0.7 * m["first_val_loss"] and m["val_bpb"] < m["first_val_bpb"], c["val"]
    assert m["tokens_per_s"] > 0 and m["train_seconds"] > 0 and m["device_type"] == "cpu" and m["mfu"] is None
    out = spec.parent / "out"
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "model.json", "model.safetensors", "samples.json", "tokenizer"]
    assert common.checkpoint_stage(out) == "mid" and json.loads((out / "model.json").read_text())["step"] == m["steps"]
    assert [s["prompt"] for s in json.loads((out / "samples.json").read_text())][:1] == ["Hi! Who are you?"]
    model, _ = common.load_start(out, "sft", "cpu")  # what sft starts from
    assert model.config.sequence_len == 64


def test_lr_schedule_is_what_the_optimizer_applies(tiny_checkpoint, mid_data, tmp_path, monkeypatch, sigterm_restored):
    applied = []
    real_step = mid.common.optimizer_step

    def spy(model, optimizers, grad_clip, rt):
        applied.append([[(g["lr"], g.get("momentum")) for g in opt.param_groups] for opt in optimizers])
        return real_step(model, optimizers, grad_clip, rt)

    monkeypatch.setattr(mid.common, "optimizer_step", spy)
    cfg = small(num_iterations=10, warmdown_ratio=0.4, init_lr_frac=0.5, eval_every=100)
    metrics = mid.train(json.loads(spec_file(tmp_path, tiny_checkpoint, mid_data, cfg).read_text()))
    assert metrics["steps"] == 10 and len(applied) == 10
    scale = (128 / 768) ** -0.5  # the tiny model's width is 128
    mults = [1.0] * 7 + [3 / 4, 2 / 4, 1 / 4]  # constant, then linear to 0 over the last 4 steps
    for step, (adam, muon) in enumerate(applied):
        m = mults[step]
        assert adam[0][0] == pytest.approx(0.2 * scale * 0.5 * m) and adam[1][0] == pytest.approx(0.004 * scale * 0.5 * m)
        assert muon[0][0] == pytest.approx(0.02 * 0.5 * m)
        assert muon[0][1] == pytest.approx(0.85 + 0.1 * min(step / 5, 1))  # Muon momentum warmup
    assert curve(spec_file(tmp_path, tiny_checkpoint, mid_data, cfg))["train"]["lr_mult"] == pytest.approx(mults)


def test_mask_loss_trains_on_assistant_tokens_only(tiny_checkpoint, mid_data, tmp_path, sigterm_restored):
    runs = {}
    for mask in (False, True):
        spec = spec_file(tmp_path, tiny_checkpoint, mid_data, small(num_iterations=3, eval_every=3, mask_loss=mask), f"mask{mask}")
        runs[mask] = (mid.train(json.loads(spec.read_text())), curve(spec))
    (plain, a), (masked, b) = runs[False], runs[True]
    assert plain["mask_loss"] is False and masked["mask_loss"] is True
    assert a["train"]["train_loss"][0] != b["train"]["train_loss"][0]
    assert a["val"][0]["val_loss"] != b["val"][0]["val_loss"]  # val counts the same targets as training


def test_resume_after_kill_9_equals_uninterrupted(tiny_checkpoint, mid_data, tmp_path):
    cfg = small(num_iterations=30, checkpoint_every=10, eval_every=15)
    straight = spec_file(tmp_path, tiny_checkpoint, mid_data, cfg, "straight")
    assert run_entry(straight).returncode == 0
    resumed = spec_file(tmp_path, tiny_checkpoint, mid_data, cfg, "resumed")
    proc = subprocess.Popen([sys.executable, "-m", "model.train.mid", str(resumed)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wip = resumed.parent / "wip"
    kill_9_when(wip / "step-00000010", proc)
    assert not (resumed.parent / "out" / "model.safetensors").exists()
    r = run_entry(resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mid: resuming from step-000000" in r.stderr
    a, b = curve(straight), curve(resumed)
    assert a["train"]["step"] == b["train"]["step"] == list(range(1, 31))
    assert a["train"]["train_loss"] == b["train"]["train_loss"]  # the same loss at every step, exactly
    assert a["val"] == b["val"]
    assert (straight.parent / "out" / "model.safetensors").read_bytes() == (resumed.parent / "out" / "model.safetensors").read_bytes()
    assert json.loads((resumed.parent / "metrics.json").read_text())["resumed_from"]


def test_two_processes_match_one_on_the_same_global_batch(tiny_checkpoint, mid_data, tmp_path):
    cfg = small(num_iterations=4, eval_every=4, mask_loss=True)
    one = spec_file(tmp_path, tiny_checkpoint, mid_data, cfg, "one")
    two = spec_file(tmp_path, tiny_checkpoint, mid_data, cfg.model_copy(update={"nproc": 2}), "two")
    r1, r2 = run_entry(one), run_entry(two, nproc=2)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1, l2 = curve(one)["train"]["train_loss"], curve(two)["train"]["train_loss"]
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-5, (l1, l2)
    v1, v2 = curve(one)["val"], curve(two)["val"]
    assert [e["step"] for e in v1] == [e["step"] for e in v2] == [0, 4]
    assert max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(v1, v2)) <= 1e-5
    assert json.loads((two.parent / "metrics.json").read_text())["world_size"] == 2
    w1, w2 = load_file(str(one.parent / "out" / "model.safetensors")), load_file(str(two.parent / "out" / "model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_checkpoint, mid_data, tmp_path, capsys, sigterm_restored):
    tok_dir, dataset_dir = tiny_checkpoint.parent / "tok", tiny_checkpoint.parent / "data"
    mid_ckpt = tmp_path / "mid-ckpt"
    shutil.copytree(tiny_checkpoint, mid_ckpt)
    meta = json.loads((mid_ckpt / "model.json").read_text())
    (mid_ckpt / "model.json").write_text(json.dumps({**meta, "stage": "mid"}))
    empty = write_conversations(tmp_path / "empty", [], arithmetic(3))
    cases = [
        (tok_dir, mid_data, small(), "is not a checkpoint artifact (no model.json): mid starts from a base checkpoint"),
        (dataset_dir, mid_data, small(), "is not a checkpoint artifact"),
        (mid_ckpt, mid_data, small(), "mid starts from a base checkpoint, but"),
        (tiny_checkpoint, tiny_checkpoint, small(), "has no train.parquet: pass a conversations artifact"),
        (tiny_checkpoint, empty, small(), "the train split of"),
        (tiny_checkpoint, mid_data, small(total_batch_size=500), "mid.total_batch_size 500 / (device_batch_size 4 × the model's sequence_len 64) must be a whole multiple of 1"),
    ]
    for i, (ckpt, data, cfg, message) in enumerate(cases):
        spec = spec_file(tmp_path, ckpt, data, cfg, f"case{i}")
        assert mid.main([str(spec)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mid: error: ") and message in err[0], err
        assert list((spec.parent / "out").iterdir()) == [] and not (spec.parent / "wip").exists()


@pytest.mark.parametrize("stage", ["mid", "sft"])
def test_stage_defs_launch_the_entry_point_with_a_spec_it_runs(stage, tiny_checkpoint, mid_data, tmp_path, monkeypatch,
                                                              sigterm_restored):
    """tasks/mid.py and tasks/sft.py: inputs by stage name, the spec the entry point reads, metrics back."""
    import importlib

    from model.config import SftConfig
    from model.train import sft
    from tasks.stage import StageContext

    task = importlib.import_module(f"tasks.{stage}")
    start = tiny_checkpoint
    if stage == "sft":  # sft starts from a mid checkpoint
        start = tmp_path / "mid-ckpt"
        shutil.copytree(tiny_checkpoint, start)
        (start / "model.json").write_text(json.dumps({**json.loads((start / "model.json").read_text()), "stage": "mid"}))
    cfg = small(num_iterations=2) if stage == "mid" else SftConfig(examples_per_step=4, device_batch_size=2, num_iterations=2, device="cpu")
    calls = []

    def fake_launch(module, spec, work_dir, nproc, log, **limits):
        calls.append((module, nproc))
        assert limits == {"timeout_minutes": None, "limit_name": f"{stage}.timeout_minutes", "expect": CHECKPOINT_FILES}
        return {"mid": mid, "sft": sft}[stage].train(spec)

    monkeypatch.setattr(task, "launch", fake_launch)
    parent, data = task.STAGE.inputs
    (tmp_path / "out").mkdir()
    ctx = StageContext(inputs={parent: start, data: mid_data}, out_dir=tmp_path / "out", download_dir=tmp_path / "dl",
                       wip_dir=tmp_path / "wip")
    metrics = task.compute(cfg, ctx)
    assert calls == [(f"model.train.{stage}", 1)] and metrics["steps"] == 2
    assert ctx.device == {"type": "cpu", "count": 1, "nodes": 1}
    assert common.checkpoint_stage(tmp_path / "out") == stage
    assert (task.STAGE.name, task.STAGE.kind, task.STAGE.section) == (stage, "checkpoint", stage)
    assert f"model.train.{stage}" in task.STAGE.code and "model.data.chat_loader" in task.STAGE.code
