"""Optimizers and schedules of nanochat's base-training recipe.

Two optimizers, returned as ``[adamw, muon]``:

- ``torch.optim.Muon`` (our thin subclass ``Muon``, see the end of this docstring) for every 2-D matrix inside ``model.blocks``: lr ``matrix_lr``, weight decay 0,
  Nesterov momentum (``muon_momentum_start`` rising to ``muon_momentum_end``), 5 Newton–Schulz steps with
  Keller Jordan's quintic coefficients (3.4445, −4.7750, 2.0315), update scaled by sqrt(max(1, rows/cols)).
- AdamW for the token embedding (lr ``embedding_lr``) and the output head (lr ``unembedding_lr``), both
  × (n_embd / 768) ** -0.5, betas ``adam_betas``, eps ``adam_eps``, weight decay 0; fused on CUDA and CPU.

What torch 2.13's ``torch.optim.Muon`` does, read from its source (``torch/optim/_muon.py``), against the
recipe (nanochat's Muon, itself Keller Jordan's):

- momentum buffer: ``buf.lerp_(grad, 1 - momentum)``, i.e. ``buf = μ·buf + (1−μ)·g`` (an EMA);
  Nesterov: ``update = grad.lerp(buf, μ)`` = ``(1−μ)·g + μ·buf``. Identical to the recipe. (Its docstring
  writes the un-normalized form ``B = μB + g``, ``g + μB``; the code, which is what runs, is the EMA form.
  The two differ by a constant factor only while μ is constant; with our momentum warmup the code's form
  is the one the recipe uses.) ``momentum`` is read from the param group at every step, so the schedule
  below takes effect by writing ``group["momentum"]``.
- Newton–Schulz: cast to bfloat16, transpose when rows > cols, divide by the Frobenius norm clamped at
  eps=1e-7, then 5 × (A = XXᵀ; B = bA + cA²; X = aX + BX) via ``addmm``, transpose back. Same iteration,
  same precision as the recipe. One difference: the recipe divides by ``norm + 1e-7``, torch by
  ``max(norm, 1e-7)``; for any gradient with norm ≫ 1e-7 (everything real; in bf16 the 1e-7 vanishes
  anyway) the two are equal, and for an all-zero gradient both give a zero update.
- LR: with ``adjust_lr_fn=None`` ("original") the step is ``lr · sqrt(max(1, rows/cols))``, as in the
  recipe. Weight decay is applied as ``p *= 1 − lr·wd`` with the unscaled lr; we pass wd = 0 (the recipe
  has none), so it is a no-op. (torch's default weight_decay is 0.1: it must be passed explicitly.)
- Parameters whose ``.grad`` is None are skipped, as in the recipe.
- Not the same: the recipe's distributed Muon shards the Newton–Schulz work across ranks (reduce-scatter,
  orthogonalize a share, all-gather) and its distributed AdamW shards optimizer state. Here the training
  loop all-reduces gradients and every rank runs the full, identical update: same numbers, redundant
  compute and replicated state. ``world_size`` is accepted for that reason and does not change the math.
- Not the same as *later* nanochat versions (Polar-Express coefficients, NorMuon variance reduction,
  cautious weight decay): this module follows the original d20 speedrun recipe.

- Our one change, ``Muon`` below: for parameters on the CPU the Newton–Schulz iteration runs in float32
  instead of bfloat16. Reason: on CPUs without native bf16 matmul (AVX2, i.e. most laptops and this
  project's CI) torch's bf16 ``addmm`` is 10–70× slower than fp32 (measured: a 1024×256 matrix, 5 NS steps,
  764 ms bf16 vs ~10 ms fp32 on one core), which made the optimizer step 5× the forward+backward of the
  ``tiny`` preset. The math is the same iteration; fp32 is closer to the exact polynomial (the bf16
  path is ~1.5% off a float64 reference, fp32 ~1e-6). Matrices of one shape are updated together (foreach
  momentum, batched Newton–Schulz), the same iteration per matrix. On CUDA (and any non-CPU device) ``step()``
  is torch's own, unchanged. Momentum buffers have torch's layout, so optimizer state moves between the two.

``tests/model/test_optim.py`` checks a step of torch's Muon, and of ours, against an independent reference.
"""
from __future__ import annotations

import math

import torch

from model.config import BaseConfig
from model.errors import InputError


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton–Schulz runs in ``cpu_ns_dtype`` (float32) for CPU parameters.

    Identical to torch's step otherwise (EMA momentum buffer, Nesterov lerp, 5 quintic NS steps on the
    transposed matrix when rows > cols, Frobenius normalization clamped at eps, lr·sqrt(max(1, rows/cols)),
    decoupled weight decay with the unscaled lr). Non-CPU parameters go through ``torch.optim.Muon.step``.
    """

    cpu_ns_dtype = torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        if not any(p.device.type == "cpu" for g in self.param_groups for p in g["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # matrices of one shape go through momentum and Newton–Schulz together (foreach ops, one batched
            # matmul per NS product): on small models the per-matrix loop is mostly dispatch overhead
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((tuple(p.shape), p.dtype), []).append(p)
            for (shape, _), params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = []
                for p, g in zip(params, grads):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - mu)
                updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
                ortho = orthogonalize(torch.stack(updates), group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      self.cpu_ns_dtype)
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                scale = -lr * _lr_scale(group["adjust_lr_fn"], shape)
                torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(ortho.unbind(0), params)], alpha=scale)
        return loss


def _lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's AdjustLR: "original" (default) sqrt(max(1, rows/cols)); "match_rms_adamw" 0.2·sqrt(max(rows, cols))."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


def orthogonalize(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Quintic Newton–Schulz: X ← aX + (bA + cA²)X, A = XXᵀ, on X = G/‖G‖_F (transposed when rows > cols).

    `g` is one matrix (R, C) or a stack of them (N, R, C), each normalized and iterated on its own."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    mm = torch.baddbmm if x.dim() == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def build_optimizers(model, cfg: BaseConfig, world_size: int = 1) -> list[torch.optim.Optimizer]:
    """``[AdamW(embedding, head), Muon(block matrices)]``; each group carries its ``initial_lr``.

    The Muon is ``model.optim.Muon``, a ``torch.optim.Muon`` (float32 Newton–Schulz on CPU, see above).
    """
    embedding, head, matrices, stray = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "embed.weight":
            embedding.append(p)
        elif name == "lm_head.weight":
            head.append(p)
        elif name.startswith("blocks.") and p.ndim == 2:
            matrices.append(p)
        else:
            stray.append(f"{name} {tuple(p.shape)}")
    if stray:
        raise InputError(
            f"parameters in no optimizer group: {', '.join(stray)}: "
            "give them a group in model/nn/optim.py (Muon takes 2-D matrices under blocks.)"
        )
    if not embedding or not head:
        raise InputError("the model has no `embed.weight` or no `lm_head.weight`: the optimizer contract needs both names")

    scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        {"params": embedding, "lr": cfg.embedding_lr * scale, "initial_lr": cfg.embedding_lr * scale},
        {"params": head, "lr": cfg.unembedding_lr * scale, "initial_lr": cfg.unembedding_lr * scale},
    ]
    adamw = torch.optim.AdamW(adam_groups, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=0.0,
                              **_adamw_impl([p for g in adam_groups for p in g["params"]]))
    optimizers: list[torch.optim.Optimizer] = [adamw]
    if matrices:
        muon = Muon(
            [{"params": matrices, "lr": cfg.matrix_lr, "initial_lr": cfg.matrix_lr}],
            lr=cfg.matrix_lr, weight_decay=0.0, momentum=cfg.muon_momentum_start, nesterov=True,
            ns_coefficients=NS_COEFFICIENTS, eps=1e-7, ns_steps=5, adjust_lr_fn=None,
        )
        optimizers.append(muon)
    return optimizers


def _adamw_impl(params: list[torch.Tensor]) -> dict:
    """fused where torch has the kernel for all the parameters (CUDA; CPU since torch 2.4; float types): one
    kernel per step instead of a dozen elementwise passes; else foreach (one op over all tensors)."""
    devices = {p.device.type for p in params}
    if len(devices) == 1 and devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def lr_multiplier(step: int, total_steps: int, cfg: BaseConfig) -> float:
    """Warmup, constant, warmdown.

    - warmup (W = round(warmup_ratio · total)): (step + 1) / W for step < W, a linear ramp from 0 that
      reaches 1 at step W − 1 (so no step is spent at LR 0);
    - then 1.0 up to and including step total − D (D = round(warmdown_ratio · total));
    - then linear to ``final_lr_frac``: p + (1 − p)·final_lr_frac with p = (total − step) / D, which is
      final_lr_frac at step = total (the last step taken, total − 1, is 1/D of the way above it).
    """
    warmup = round(cfg.warmup_ratio * total_steps)
    warmdown = round(cfg.warmdown_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= total_steps - warmdown:
        return 1.0
    progress = max(0.0, (total_steps - step) / warmdown)
    return progress + (1.0 - progress) * cfg.final_lr_frac


def muon_momentum(step: int, cfg: BaseConfig) -> float:
    """Linear from muon_momentum_start (step 0) to muon_momentum_end (step muon_momentum_warmup), then constant."""
    frac = min(step / cfg.muon_momentum_warmup, 1.0) if cfg.muon_momentum_warmup > 0 else 1.0
    return (1.0 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum_end


def apply_schedules(optimizers: list[torch.optim.Optimizer], step: int, total_steps: int, cfg: BaseConfig) -> None:
    """Set every group's lr = initial_lr × lr_multiplier, and every Muon group's momentum."""
    mult = lr_multiplier(step, total_steps, cfg)
    momentum = muon_momentum(step, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
            if isinstance(opt, torch.optim.Muon):
                group["momentum"] = momentum
