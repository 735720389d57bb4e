"""The `rl` stage (REINFORCE with a group-mean baseline, on-policy, no KL): rewards, advantages, the masked and
normalized loss, pass@k, the LR schedule the optimizer applies, exact resume after kill -9, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import kill_9_when
from model.config import RlConfig
from model.train import rl, runtime

ROOT = Path(__file__).resolve().parents[3]
CPU = runtime.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# ---------------------------------------------------------------- inputs

def problem_rows(n: int, offset: int = 0, answers: bool = True) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 5, (i * 3) % 5
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"#### {a + b}"}]
        rows.append({"messages": json.dumps(messages), "source": "toy", "answer": str(a + b) if answers else None})
    return rows


def write_problems(d: Path, train: list[dict], val: list[dict]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("messages", pa.string()), ("source", pa.string()), ("answer", pa.string())])
    for split, rows in (("train", train), ("val", val)):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / f"{split}.parquet")
    return d


@pytest.fixture(scope="module")
def sft_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny base checkpoint, taught for a few steps to answer "#### <digit>", saved as an sft checkpoint:
    its samples are right some of the time, so rewards (and advantages) vary within a group."""
    from model.chat.conversation import render
    from model.nn.checkpoint import save_weights
    from model.nn.load import load_model

    out = tmp_path_factory.mktemp("sft") / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    meta = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**meta, "stage": "sft"}))
    torch.manual_seed(0)
    model, tok = load_model(out, "cpu")
    model.train()
    rows = [render(json.loads(r["messages"]), tok) for r in problem_rows(25)]
    width = max(len(ids) for ids, _ in rows)
    x = torch.zeros(len(rows), width - 1, dtype=torch.long)
    y = torch.full((len(rows), width - 1), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, : len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for _ in range(25):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    save_weights(model, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    return write_problems(tmp_path_factory.mktemp("problems"), problem_rows(12), problem_rows(4, offset=12))


def small(**over) -> RlConfig:
    base = dict(examples_per_step=2, num_samples=4, device_batch_size=2, max_new_tokens=8, num_iterations=4,
                eval_every=2, eval_examples=3, pass_k=3, checkpoint_every=1000, device="cpu")
    return RlConfig(**{**base, **over})


def spec_file(tmp: Path, ckpt: Path, data: Path, cfg: RlConfig, name: str = "run") -> Path:
    d = tmp / name
    (d / "out").mkdir(parents=True, exist_ok=True)
    spec = {"config": cfg.model_dump(mode="json"), "checkpoint_dir": str(ckpt), "data_dir": str(data),
            "out_dir": str(d / "out"), "wip_dir": str(d / "wip"), "metrics_path": str(d / "metrics.json")}
    path = d / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_entry(spec: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.train.rl", str(spec)], capture_output=True, text=True,
                          env=env(), timeout=600, cwd=ROOT)


def read(spec: Path, name: str):
    return json.loads((spec.parent / "out" / name).read_text())


@pytest.fixture
def sigterm_restored():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


# ---------------------------------------------------------------- rewards, advantages, the loss

def test_reward_reads_the_final_answer_and_advantages_subtract_the_group_mean():
    assert rl.reward("3 plus 4 is 7.\n#### 7<|assistant_end|>", "7") == 1.0
    assert rl.reward("#### 1,234.", "1234") == 1.0
    assert rl.reward("#### 7.0", "7") == 1.0
    assert rl.reward("the answer is 7", "7") == 0.0  # no "####": no answer
    assert rl.reward("#### 7 then #### 8", "7") == 0.0  # the last "####" counts
    assert rl.reward("#### $72", "72") == 1.0
    assert rl.advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    assert rl.advantages([1.0, 0.0, 0.0, 0.0]) == [0.75, -0.25, -0.25, -0.25]
    assert rl.advantages([0.0, 0.0, 0.0]) == [0.0, 0.0, 0.0]  # no signal when the whole group agrees
    assert rl.advantages([1.0, 1.0]) == [0.0, 0.0]


def test_loss_counts_only_sampled_tokens_and_is_normalized_per_batch():
    prompt = [1, 2, 3]
    # sample 0: two sampled tokens, two forced tool-output tokens (mask 0), one sampled; sample 1: two sampled
    batch = [([10, 11, 12, 13, 14], [1, 1, 0, 0, 1]), ([20, 21], [1, 1])]
    inputs, targets = rl.rollout_batch(prompt, batch, pad_id=99)
    assert inputs.tolist() == [[1, 2, 3, 10, 11, 12, 13], [1, 2, 3, 20, 21, 99, 99]]
    assert targets.tolist() == [[-1, -1, 10, 11, -1, -1, 14], [-1, -1, 20, 21, -1, -1, -1]]

    nll = torch.rand(2, 7, dtype=torch.float64).add_(0.1).requires_grad_()
    adv = torch.tensor([0.5, -0.25])
    loss = rl.pg_loss(nll, targets, adv, num_batches=2, examples_per_rank=3)
    valid = targets >= 0
    denominator = 5 * 2 * 3  # valid targets in the batch × generation batches × problems per process
    expected = (nll.detach().float() * adv[:, None] * valid).sum() / denominator
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grad = nll.grad.float()
    assert (grad[~valid] == 0).all()  # prompt, forced tool output and padding contribute nothing
    assert torch.allclose(grad[0, valid[0]], torch.full((3,), 0.5 / denominator))
    assert torch.allclose(grad[1, valid[1]], torch.full((2,), -0.25 / denominator))


def test_loss_with_a_real_model_ignores_masked_positions(sft_checkpoint):
    from model.nn.load import load_model

    model, tok = load_model(sft_checkpoint, "cpu")
    prompt = [tok.bos_id, *tok.encode("hi")]
    batch = [([5, 6, 7], [1, 0, 1]), ([8], [1])]
    inputs, targets = rl.rollout_batch(prompt, batch, pad_id=tok.special_id("<|assistant_end|>"))
    nll = model(inputs, targets, loss_reduction="none")
    assert (nll[targets < 0] == 0).all()
    loss = rl.pg_loss(nll, targets, torch.tensor([1.0, -1.0]), 1, 1)
    assert loss.item() == pytest.approx(((nll[0, targets[0] >= 0].sum() - nll[1, targets[1] >= 0].sum()) / 3).item(), rel=1e-5)


def test_pass_at_k_on_a_stub_sampler():
    answers = ["1", "2", "3", "4"]
    problems = [rl.Problem(i, [0], a, f"q{i}", "toy") for i, a in enumerate(answers)]
    texts = {  # the position of the first correct sample: 1, 3, never, 2
        0: ["#### 1", "#### 9", "#### 1", "x", "#### 1"],
        1: ["x", "#### 9", "#### 2", "#### 2", "x"],
        2: ["#### 2", "#### 4", "#### 9", "x", "#### 3"],  # right only at 5 > k
        3: ["#### 0", "#### 4.0", "x", "x", "x"],
    }
    seen = []

    def stub(p):
        seen.append(p.index)
        return texts[p.index]

    assert rl.pass_at_k(problems, stub, 4, CPU) == [0.25, 0.5, 0.75, 0.75]
    assert seen == [0, 1, 2, 3]


def test_problem_order_is_a_seeded_permutation_per_epoch():
    steps = [rl.step_positions(s, 3, 6, seed=7) for s in range(4)]
    assert sorted(steps[0] + steps[1]) == list(range(6)) == sorted(steps[2] + steps[3])
    assert steps[0] + steps[1] != steps[2] + steps[3]  # each epoch has its own order
    assert steps == [rl.step_positions(s, 3, 6, seed=7) for s in range(4)]
    assert steps != [rl.step_positions(s, 3, 6, seed=8) for s in range(4)]
    assert rl.num_steps(small(num_iterations=None, num_epochs=2, examples_per_step=5), 12) == 4
    assert rl.num_steps(small(num_iterations=None, examples_per_step=50), 12) == 1


# ---------------------------------------------------------------- the stage

def test_trains_with_the_linear_lr_schedule_and_writes_curves(sft_checkpoint, problems, tmp_path, monkeypatch,
                                                              sigterm_restored):
    applied = []
    real_step = rl.common.optimizer_step

    def spy(model, optimizers, grad_clip, rt):
        applied.append([[g["lr"] for g in opt.param_groups] for opt in optimizers])
        return real_step(model, optimizers, grad_clip, rt)

    monkeypatch.setattr(rl.common, "optimizer_step", spy)
    cfg = small()
    spec = json.loads(spec_file(tmp_path, sft_checkpoint, problems, cfg).read_text())
    metrics = rl.train(spec)

    scale = (json.loads((sft_checkpoint / "model.json").read_text())["model"]["n_embd"] / 768) ** -0.5
    base = [[cfg.embedding_lr * scale, cfg.unembedding_lr * scale], [cfg.matrix_lr]]
    assert len(applied) == 4
    for step, lrs in enumerate(applied):
        mult = cfg.init_lr_frac * (1 - step / 4)
        for got, want in zip(lrs, base):
            assert got == pytest.approx([w * mult for w in want], rel=1e-12)

    out = Path(spec["out_dir"])
    assert sorted(p.name for p in out.iterdir()) == ["curve.json", "model.json", "model.safetensors", "samples.json", "tokenizer"]
    assert json.loads((out / "model.json").read_text())["stage"] == "rl"
    curve = json.loads((out / "curve.json").read_text())
    assert curve["algorithm"] == "REINFORCE with a group-mean baseline, on-policy, no KL"
    assert curve["train"]["step"] == [1, 2, 3, 4]
    assert curve["train"]["lr_mult"] == [1.0, 0.75, 0.5, 0.25]
    assert all(0 <= r <= 1 for r in curve["train"]["mean_reward"])
    assert [e["step"] for e in curve["eval"]] == [0, 2, 4]
    assert all(set(e) == {"step", "problems", "pass@1", "pass@2", "pass@3"} and e["problems"] == 3 for e in curve["eval"])
    assert all(e["pass@1"] <= e["pass@2"] <= e["pass@3"] for e in curve["eval"])
    samples = json.loads((out / "samples.json").read_text())
    assert [s["step"] for s in samples] == [0, 2, 3]
    assert all(len(s["samples"]) == 4 and s["answer"] for s in samples)
    assert metrics["steps"] == 4 and metrics["pass_k"] == 3 and metrics["sequences_sampled"] == 4 * 2 * 4
    assert metrics["pass@1"] == curve["eval"][-1]["pass@1"] and metrics["pass@k"] == curve["eval"][-1]["pass@3"]
    assert metrics["mean_reward"] == curve["train"]["mean_reward"][-1]
    assert metrics["samples_per_s"] > 0 and metrics["tokens_sampled"] == sum(curve["train"]["tokens_sampled"]) > 0
    assert metrics["algorithm"] == curve["algorithm"]


def test_resume_after_kill_9_equals_uninterrupted(sft_checkpoint, problems, tmp_path):
    cfg = small(num_iterations=6, checkpoint_every=3, eval_every=3)
    straight = spec_file(tmp_path, sft_checkpoint, problems, cfg, "straight")
    r = run_entry(straight)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "REINFORCE with a group-mean baseline, on-policy, no KL" in r.stderr
    a = read(straight, "curve.json")
    assert any(loss != 0 for loss in a["train"]["loss"]), a  # the groups' rewards differed: a real update

    resumed = spec_file(tmp_path, sft_checkpoint, problems, cfg, "resumed")
    proc = subprocess.Popen([sys.executable, "-m", "model.train.rl", str(resumed)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wip = resumed.parent / "wip"
    kill_9_when(wip / "step-00000003", proc)
    assert not (resumed.parent / "out" / "model.safetensors").exists()
    r = run_entry(resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rl: resuming from step-0000000" in r.stderr
    b = read(resumed, "curve.json")
    assert a["train"]["step"] == b["train"]["step"] == list(range(1, 7))
    assert a["train"]["mean_reward"] == b["train"]["mean_reward"]  # the same samples at every step
    assert a["train"]["loss"] == b["train"]["loss"]  # and the same loss, exactly
    assert a["eval"] == b["eval"]
    assert read(straight, "samples.json") == read(resumed, "samples.json")
    assert (straight.parent / "out" / "model.safetensors").read_bytes() == (resumed.parent / "out" / "model.safetensors").read_bytes()
    assert json.loads((resumed.parent / "metrics.json").read_text())["resumed_from"]


def test_sigterm_writes_a_checkpoint_and_resumes(sft_checkpoint, problems, tmp_path):
    spec = spec_file(tmp_path, sft_checkpoint, problems, small(num_iterations=500, eval_every=1000))
    proc = subprocess.Popen([sys.executable, "-m", "model.train.rl", str(spec)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "pass@1" not in seen:  # the step-0 evaluation is done: training runs, the handler is installed
        line = proc.stderr.readline()
        assert line, f"exited early: {seen[-2000:]}"
        seen += line
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    ckpt = sorted((spec.parent / "wip").glob("step-*"))[-1]
    step = int(ckpt.name.split("-")[1])
    assert 0 < step < 500 and f"rl: SIGTERM: checkpoint at step {step}" in err
    raw = json.loads(spec.read_text())
    raw["config"]["num_iterations"] = step + 1
    spec.write_text(json.dumps(raw))
    r = run_entry(spec)
    assert r.returncode == 0 and f"rl: resuming from {ckpt.name}" in r.stderr, r.stderr[-2000:]
    assert read(spec, "curve.json")["train"]["step"] == list(range(1, step + 2))


def test_two_processes_match_one(sft_checkpoint, problems, tmp_path):
    """Each problem's samples depend on its row and the step, not on the process that draws them."""
    from safetensors.torch import load_file

    cfg = small(num_iterations=2, eval_every=2, eval_examples=2)
    one = spec_file(tmp_path, sft_checkpoint, problems, cfg, "one")
    two = spec_file(tmp_path, sft_checkpoint, problems, cfg.model_copy(update={"nproc": 2}), "two")
    r1 = run_entry(one)
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         "-m", "model.train.rl", str(two)], capture_output=True, text=True, env=env(), timeout=600, cwd=ROOT)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = read(one, "curve.json"), read(two, "curve.json")
    assert a["train"]["mean_reward"][0] == b["train"]["mean_reward"][0]  # the same samples
    assert a["train"]["tokens_sampled"][0] == b["train"]["tokens_sampled"][0]
    assert max(abs(x - y) for x, y in zip(a["train"]["loss"], b["train"]["loss"])) <= 1e-6
    assert a["eval"][0] == b["eval"][0]
    assert json.loads((two.parent / "metrics.json").read_text())["world_size"] == 2
    w1, w2 = load_file(str(one.parent / "out" / "model.safetensors")), load_file(str(two.parent / "out" / "model.safetensors"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


# ---------------------------------------------------------------- bad input

def _one_line_error(spec: Path, capsys) -> str:
    assert rl.main([str(spec)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("rl: error: ")
    assert not any((spec.parent / "out").iterdir()) and not (spec.parent / "wip").exists()
    assert not (spec.parent / "metrics.json").exists()
    return err


def test_problems_without_answers_are_a_one_line_error(sft_checkpoint, tmp_path, capsys, sigterm_restored):
    rows = problem_rows(6)
    rows[4]["answer"] = None
    data = write_problems(tmp_path / "data", rows, problem_rows(2))
    err = _one_line_error(spec_file(tmp_path, sft_checkpoint, data, small()), capsys)
    assert "1 of 6 train problems have no answer (first: row 4" in err and "checkable answers" in err

    pq.write_table(pa.Table.from_pylist([{"messages": r["messages"], "source": "toy"} for r in rows]), tmp_path / "data" / "train.parquet")
    err = _one_line_error(spec_file(tmp_path, sft_checkpoint, data, small(), "no-column"), capsys)
    assert "has no answer column" in err


def test_a_checkpoint_of_the_wrong_kind_is_a_one_line_error(tiny_checkpoint, problems, tmp_path, capsys, sigterm_restored):
    err = _one_line_error(spec_file(tmp_path, tiny_checkpoint, problems, small()), capsys)  # a base checkpoint
    assert "rl starts from a sft checkpoint" in err and "was made by base" in err
    err = _one_line_error(spec_file(tmp_path, problems, problems, small(), "not-a-checkpoint"), capsys)
    assert "is not a checkpoint artifact" in err
