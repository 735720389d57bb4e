"""Optimizers and schedules: group membership, schedule values, and torch.optim.Muon against a hand-written reference."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from model.config import BaseConfig
from model.errors import InputError
from model.nn.gpt import GPT, GPTConfig
from model.nn.optim import Muon, apply_schedules, build_optimizers, lr_multiplier, muon_momentum


def tiny(vocab: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, sequence_len=32))


# ---------------------------------------------------------------- schedules

def test_lr_multiplier_shape():
    cfg = BaseConfig(warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1)
    at = {s: lr_multiplier(s, 100, cfg) for s in (0, 4, 9, 10, 50, 80, 81, 90, 99, 100)}
    assert at[0] == pytest.approx(0.1)           # (step + 1) / 10 warmup steps
    assert at[4] == pytest.approx(0.5)
    assert at[9] == at[10] == at[50] == at[80] == 1.0
    assert at[81] == pytest.approx(0.95 + 0.05 * 0.1)
    assert at[90] == pytest.approx(0.5 + 0.5 * 0.1)
    assert at[99] == pytest.approx(0.05 + 0.95 * 0.1)
    assert at[100] == pytest.approx(0.1)
    values = [lr_multiplier(s, 100, cfg) for s in range(101)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11]))      # rises
    assert all(a >= b for a, b in zip(values[80:], values[81:]))       # falls


def test_lr_multiplier_defaults_no_warmup_and_decay_to_zero():
    cfg = BaseConfig()  # warmup 0, warmdown 0.2, final 0
    assert lr_multiplier(0, 1000, cfg) == 1.0
    assert lr_multiplier(800, 1000, cfg) == 1.0
    assert lr_multiplier(900, 1000, cfg) == pytest.approx(0.5)
    assert lr_multiplier(999, 1000, cfg) == pytest.approx(0.005)
    assert lr_multiplier(1000, 1000, cfg) == 0.0
    assert lr_multiplier(0, 1, BaseConfig(warmdown_ratio=0.0)) == 1.0


def test_muon_momentum_warmup():
    cfg = BaseConfig()  # 0.85 → 0.95 over 300 steps
    assert muon_momentum(0, cfg) == pytest.approx(0.85)
    assert muon_momentum(150, cfg) == pytest.approx(0.90)
    assert muon_momentum(30, cfg) == pytest.approx(0.86)
    assert muon_momentum(300, cfg) == pytest.approx(0.95)
    assert muon_momentum(5000, cfg) == pytest.approx(0.95)
    assert muon_momentum(0, BaseConfig(muon_momentum_warmup=0)) == pytest.approx(0.95)


# ---------------------------------------------------------------- groups

def test_group_membership_and_learning_rates():
    model = tiny()
    cfg = BaseConfig()
    adamw, muon = build_optimizers(model, cfg)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon) and isinstance(muon, torch.optim.Muon)
    scale = (64 / 768) ** -0.5
    emb, head = adamw.param_groups
    assert emb["params"] == [model.embed.weight] and head["params"] == [model.lm_head.weight]
    assert emb["lr"] == emb["initial_lr"] == pytest.approx(0.2 * scale)
    assert head["lr"] == head["initial_lr"] == pytest.approx(0.004 * scale)
    for g in (emb, head):
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0.0
    (mg,) = muon.param_groups
    block_matrices = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
    assert len(block_matrices) == 2 * 6
    assert {id(p) for p in mg["params"]} == {id(p) for p in block_matrices}
    assert mg["lr"] == mg["initial_lr"] == 0.02
    assert mg["weight_decay"] == 0.0 and mg["momentum"] == 0.85 and mg["nesterov"] is True
    assert mg["ns_coefficients"] == (3.4445, -4.7750, 2.0315) and mg["ns_steps"] == 5 and mg["adjust_lr_fn"] is None
    grouped = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # everything, exactly once


def test_a_parameter_in_no_group_is_an_error():
    model = tiny()
    model.blocks[0].attn.gain = torch.nn.Parameter(torch.ones(64))  # a 1-D param: neither Muon nor AdamW's
    with pytest.raises(InputError, match=r"parameters in no optimizer group: blocks\.0\.attn\.gain \(64,\)"):
        build_optimizers(model, BaseConfig())


def test_apply_schedules_sets_lr_and_momentum():
    model = tiny()
    cfg = BaseConfig(warmup_ratio=0.1)
    opts = build_optimizers(model, cfg)
    apply_schedules(opts, 4, 100, cfg)  # warmup: 5/10; momentum 0.85 + 4/300 · 0.1
    for opt in opts:
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(0.5 * g["initial_lr"])
    assert opts[1].param_groups[0]["momentum"] == pytest.approx(0.85 + 0.1 * 4 / 300)
    assert "momentum" not in opts[0].param_groups[0]


def test_optimizer_state_survives_a_weights_only_round_trip(tmp_path):
    model = tiny()
    opts = build_optimizers(model, BaseConfig())
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    for o in opts:
        o.step()
    torch.save([o.state_dict() for o in opts], tmp_path / "o.pt")
    loaded = torch.load(tmp_path / "o.pt", weights_only=True)
    fresh = build_optimizers(tiny(), BaseConfig())
    for o, sd in zip(fresh, loaded):
        o.load_state_dict(sd)
    assert fresh[1].param_groups[0]["initial_lr"] == 0.02


# ---------------------------------------------------------------- steps

def test_which_parameters_move_on_the_first_three_steps():
    """Zero-init head and output projections gate the gradient, so parameters start moving in three waves:

    step 1: only the head has a gradient (its input is nonzero; everything below it sees headᵀ·dlogits = 0);
    step 2: the head is nonzero, so the residual stream gets a gradient: the embedding and the two
            output projections (attn.c_proj, mlp.c_proj) move; q/k/v/c_fc still sit behind zero projections;
    step 3: everything moves. Rows of the padded vocabulary never move.
    """
    model = tiny(vocab=60)  # padded to 64
    opts = build_optimizers(model, BaseConfig())
    x = torch.arange(60).repeat(2)[:96].view(3, 32)  # every real token appears
    y = torch.roll(x, -1, dims=1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step() -> set[str]:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(x, y).backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    projections = {n for n, _ in model.named_parameters() if n.endswith("c_proj.weight")}
    everything = {n for n, _ in model.named_parameters()}
    assert step() == {"lm_head.weight"}
    assert step() == {"lm_head.weight", "embed.weight"} | projections
    assert step() == everything
    for name in ("embed.weight", "lm_head.weight"):
        p = dict(model.named_parameters())[name]
        assert torch.equal(p[60:], start[name][60:])            # padded rows untouched
        assert (p[:60] != start[name][:60]).any(dim=1).all()   # every real row moved


# ---------------------------------------------------------------- Muon against a reference

A, B, C = 3.4445, -4.7750, 2.0315
TOL = 0.035


def reference_orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic Newton–Schulz in float64: X ← aX + (bA + cA²)X, A = XXᵀ."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm()
    for _ in range(steps):
        a = x @ x.T
        x = A * x + (B * a + C * a @ a) @ x
    return x.T if tall else x


@pytest.mark.parametrize("cls, tol", [(torch.optim.Muon, TOL), (Muon, 1e-4)], ids=["torch", "ours-fp32-cpu"])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_muon_update_equals_a_hand_written_reference(shape, cls, tol):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape))
    lr, momenta = 0.02, [0.85, 0.9, 0.95]
    opt = cls([w], lr=lr, weight_decay=0.0, momentum=momenta[0], nesterov=True,
              ns_coefficients=(A, B, C), eps=1e-7, ns_steps=5, adjust_lr_fn=None)
    scale = math.sqrt(max(1.0, shape[0] / shape[1]))
    buf = torch.zeros(shape, dtype=torch.float64)
    for mu in momenta:  # the momentum changes between steps, as under the warmup schedule
        opt.param_groups[0]["momentum"] = mu
        g = torch.randn(shape)
        w.grad = g.clone()
        before = w.detach().double().clone()
        opt.step()
        buf = mu * buf + (1 - mu) * g.double()          # EMA momentum buffer
        nesterov = (1 - mu) * g.double() + mu * buf      # grad.lerp(buf, mu)
        expected = before - lr * scale * reference_orthogonalize(nesterov)
        update, ref_update = w.detach().double() - before, expected - before
        # torch orthogonalizes in bfloat16 (measured: 1.3–1.9% relative error against float64 over
        # shapes and seeds; every plausible mistake is off by ≥ 8%, next test); ours in float32 on CPU
        err = (update - ref_update).norm() / ref_update.norm()
        assert err < tol, f"relative error {err:.2e}"
        torch.testing.assert_close(opt.state[w]["momentum_buffer"].double(), buf, rtol=1e-5, atol=1e-6)
        assert torch.equal(w.grad, g)  # the gradient is not modified in place


def test_our_muon_state_is_interchangeable_with_torchs():
    """Same buffers, same group keys: a checkpoint written on GPU (torch's step) resumes on CPU and back."""
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(16, 24)), torch.nn.Parameter(torch.randn(16, 24))
    w2.data.copy_(w1.data)
    theirs = torch.optim.Muon([w1], lr=0.02, weight_decay=0.0, momentum=0.9)
    w1.grad = torch.randn(16, 24)
    theirs.step()
    ours = Muon([w2], lr=0.02, weight_decay=0.0, momentum=0.9)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # deep: load_state_dict would share the buffers
    assert set(ours.state_dict()["param_groups"][0]) == set(theirs.state_dict()["param_groups"][0])
    w2.data.copy_(w1.data)
    before = w1.detach().clone()
    g = torch.randn(16, 24)
    w1.grad, w2.grad = g.clone(), g.clone()
    theirs.step()
    ours.step()
    torch.testing.assert_close(ours.state[w2]["momentum_buffer"], theirs.state[w1]["momentum_buffer"])
    assert ours.state[w2]["momentum_buffer"] is not theirs.state[w1]["momentum_buffer"]
    assert (w2 - w1).norm() / (w1 - before).norm() < TOL  # updates agree up to torch's bf16 rounding


def test_our_muon_handles_weight_decay_and_missing_grads_like_torch():
    torch.manual_seed(0)
    w, idle = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    before_idle = idle.detach().clone()
    opt = Muon([w, idle], lr=0.1, weight_decay=0.5, momentum=0.9)
    w.grad = torch.zeros(8, 8)  # zero gradient: only the decay acts
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.1 * 0.5))
    assert torch.equal(idle, before_idle) and idle not in opt.state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_our_muon_is_exactly_torchs():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(256, 64, device="cuda"))
    w2 = torch.nn.Parameter(w1.detach().clone())
    opts = [torch.optim.Muon([w1], lr=0.02, weight_decay=0.0, momentum=0.9), Muon([w2], lr=0.02, weight_decay=0.0, momentum=0.9)]
    for _ in range(3):
        g = torch.randn(256, 64, device="cuda")
        w1.grad, w2.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    assert torch.equal(w1, w2)


def test_muon_reference_would_catch_the_plausible_mistakes():
    """The tolerance above is tight enough: each wrong variant misses the real update by well over TOL."""
    torch.manual_seed(1)
    shape, lr, mu = (48, 16), 0.02, 0.9
    w = torch.nn.Parameter(torch.randn(shape))
    opt = torch.optim.Muon([w], lr=lr, weight_decay=0.0, momentum=0.85, nesterov=True)
    g1, g2 = torch.randn(shape), torch.randn(shape)
    w.grad = g1
    opt.step()
    opt.param_groups[0]["momentum"] = mu
    w.grad = g2
    before = w.detach().double().clone()
    opt.step()
    update = w.detach().double() - before
    g1, g2 = g1.double(), g2.double()
    ema = mu * (0.15 * g1) + (1 - mu) * g2
    right = -lr * math.sqrt(3) * reference_orthogonalize((1 - mu) * g2 + mu * ema)
    wrong = {
        "no Nesterov": -lr * math.sqrt(3) * reference_orthogonalize(ema),
        "sum-form buffer": -lr * math.sqrt(3) * reference_orthogonalize(g2 + mu * (mu * g1 + g2)),
        "no shape scaling": -lr * reference_orthogonalize((1 - mu) * g2 + mu * ema),
        "3 NS steps": -lr * math.sqrt(3) * reference_orthogonalize((1 - mu) * g2 + mu * ema, steps=3),
    }
    assert (update - right).norm() / right.norm() < TOL
    for name, upd in wrong.items():
        assert (update - upd).norm() / upd.norm() > 2 * TOL, name


def test_matrices_of_one_shape_step_together_as_each_alone():
    """Our CPU Muon batches same-shape matrices (foreach momentum, batched Newton–Schulz): each matrix gets the
    update a one-matrix optimizer gives it, including tall ones (transposed) and a group of mixed shapes."""
    torch.manual_seed(0)
    shapes = [(32, 32), (32, 32), (48, 16), (48, 16), (16, 48), (32, 32)]
    together = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True, ns_coefficients=(A, B, C), eps=1e-7, ns_steps=5)
    opt = Muon(together, **kw)
    singles = [Muon([p], **kw) for p in alone]
    for _ in range(3):
        for p, q in zip(together, alone):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in singles:
            o.step()
    for p, q, o in zip(together, alone, singles):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], o.state[q]["momentum_buffer"])


def test_adamw_is_fused_on_cpu():
    opts = build_optimizers(tiny(), BaseConfig())
    assert opts[0].defaults["fused"] is True
