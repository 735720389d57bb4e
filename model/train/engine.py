"""The two training engines behind one interface: `torch` (replicated optimizers, our all-reduce) and `deepspeed`
(ZeRO stage 1, 2 or 3 with DeepSpeed's built-in Muon). base, mid and sft drive either the same way:

    trainer = engine.make(model, optimizers, cfg, rt, accum)
    trainer.schedule(lr_mult, momentum)               # before the step's micro-batches
    for x, y in micro_batches: loss = trainer.forward(x, y); trainer.backward(loss)
    trainer.step()                                    # average over ranks, clip, step, clear gradients
    with trainer.full_params(): evaluate / sample     # every rank, in lock-step
    trainer.save(wip, step, state) / trainer.load(ckpt) / trainer.weights()

`optimizers` are the torch engine's `[AdamW, Muon]` (model/nn/optim.py); the deepspeed engine reads its param
groups from them (the parameters, each group's initial LR, the betas, eps and momentum), so the split and the
rates have one source. How DeepSpeed differs, and what this module does about it, is in model/train/zero.py.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path

import torch

from model.errors import InputError
from model.nn import checkpoint
from model.train import autocompile, common


class TorchTrainer:
    """Plain PyTorch: every rank holds all optimizer state; gradients are all-reduced after the accumulation."""

    name = "torch"
    lockstep = False  # evaluation and samples may run on rank 0 alone

    def __init__(self, model, optimizers, grad_clip: float, rt, accum: int, compile_model: bool):
        self.model, self.optimizers, self.grad_clip, self.rt, self.accum = model, optimizers, grad_clip, rt, accum
        self.forward = torch.compile(model) if compile_model else model
        self.compiled = compile_model

    def schedule(self, lr_mult: float, momentum: float) -> None:
        common.schedule(self.optimizers, lr_mult, momentum)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        common.optimizer_step(self.model, self.optimizers, self.grad_clip, self.rt)

    def full_params(self):
        return contextlib.nullcontext()

    def save(self, wip: Path, step: int, state: dict) -> None:
        if self.rt.main:
            checkpoint.save(wip, step, self.model, self.optimizers, state)
        self.rt.barrier()

    def load(self, ckpt: Path) -> dict:
        if checkpoint.read_state(ckpt).get("engine", "torch") != "torch":
            raise InputError(f"checkpoint {ckpt} was written by the deepspeed engine: resume it with engine=deepspeed, "
                             f"or delete {ckpt.parent} to start over with the torch engine")
        return checkpoint.load(ckpt, self.model, self.optimizers)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def state_extra(self) -> dict:
        return {"engine": "torch"}


def check(cfg, stage: str) -> None:
    """What an engine can refuse before any process group or model exists (the deepspeed engine: its ZeRO file)."""
    if cfg.engine == "deepspeed":
        from model.train import zero

        zero.load_config(cfg.zero_config, stage)


def make(model, optimizers, cfg, rt, accum: int, micro_batch: int, stage: str, steps: int | None = None):
    """The engine `cfg.engine` names, around `model` and the torch engine's `optimizers`. The model is compiled
    when `cfg.compile` says so; left unset, when the `steps` planned repay the compile time (model/train/autocompile.py;
    without `steps`, on CUDA only). A stage without the field (sft: variable shapes) never compiles."""
    compile_model = False
    if hasattr(cfg, "compile"):
        tokens = accum * micro_batch * model.config.sequence_len
        plan = autocompile.plan(cfg.compile, rt.device.type, torch.get_num_threads(), model.config.n_layer,
                                model.flops_per_token(), tokens, steps)
        compile_model = plan.on
        if rt.main:
            print(f"{stage}: {plan.line()}", file=sys.stderr, flush=True)
    if cfg.engine == "deepspeed":
        from model.train import zero

        return zero.DeepSpeedTrainer(model, optimizers, cfg, rt, accum, micro_batch, stage, compile_model)
    return TorchTrainer(model, optimizers, cfg.grad_clip, rt, accum, compile_model)


def atomic_dir(wip: Path, step: int, rt, write) -> Path:
    """Have every rank `write(tmp)` into one shared temporary directory, then rank 0 publishes it as `step-N`
    (model/nn/checkpoint.py: a directory with that name is always complete)."""
    tmp = wip / f".tmp-step-{step:08d}"
    if rt.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.barrier()
    write(tmp)
    rt.barrier()
    if rt.main:
        checkpoint.publish(tmp, wip, step)
    rt.barrier()
    return wip / f"{checkpoint.PREFIX}{step:08d}"
