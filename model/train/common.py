"""What the training stages (base, mid, sft, rl) share: the starting checkpoint, the optimizers, resume, one
optimizer step, the committed checkpoint, and the SIGTERM request.

mid, sft and rl each start from the checkpoint artifact of the stage before them (`load_start`), build
fresh optimizers with the base recipe's groups at `init_lr_frac` of its rates (`build`), resume from the
newest work-in-progress checkpoint when one exists (`resume`), and commit the same layout base does
(`commit`: model.safetensors, model.json with the stage that made it, the tokenizer, curves).
"""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import torch

from model.config import FinetuneOptim
from model.errors import InputError
from model.nn import checkpoint
from model.nn.load import load_model
from model.nn.optim import build_optimizers

# The stage whose checkpoint each training stage starts from (nanochat's order).
PARENT = {"mid": "base", "sft": "mid", "rl": "sft"}


def checkpoint_stage(artifact_dir: Path) -> str | None:
    """The stage that made a checkpoint artifact (model.json's "stage"); None when it is not a checkpoint."""
    try:
        meta = json.loads((Path(artifact_dir) / "model.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("stage", "base") if isinstance(meta, dict) and "model" in meta else None


def load_start(artifact_dir: Path, stage: str, device) -> tuple[torch.nn.Module, object]:
    """The model and tokenizer `stage` trains from, after checking the artifact is the right kind of checkpoint."""
    made_by, want = checkpoint_stage(artifact_dir), PARENT[stage]
    if made_by is None:
        raise InputError(f"{artifact_dir} is not a checkpoint artifact (no model.json): {stage} starts from a {want} checkpoint")
    if made_by != want:
        raise InputError(f"{stage} starts from a {want} checkpoint, but {artifact_dir} was made by {made_by}: pass the {want} stage's artifact")
    model, tok = load_model(artifact_dir, device)
    model.train()
    return model, tok


def build(model, cfg: FinetuneOptim, world_size: int = 1) -> list[torch.optim.Optimizer]:
    """Fresh `[AdamW, Muon]` with the base groups; every group starts at `init_lr_frac` × its rate."""
    optimizers = build_optimizers(model, cfg, world_size)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] *= cfg.init_lr_frac
            group["lr"] = group["initial_lr"]
    return optimizers


def schedule(optimizers, lr_mult: float, momentum: float) -> None:
    """lr = initial_lr × lr_mult for every group; `momentum` for every Muon group."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if isinstance(opt, torch.optim.Muon):
                group["momentum"] = momentum


def resume(wip: Path, trainer, model_config: dict, stage: str) -> dict | None:
    """Restore the newest work-in-progress checkpoint into `trainer` (model/train/engine.py: weights, optimizers,
    RNG); its JSON state, or None."""
    ckpt = checkpoint.latest(wip)
    if ckpt is None:
        return None
    made_for = checkpoint.read_state(ckpt).get("model")
    if made_for != model_config:
        raise InputError(f"checkpoint {ckpt} was made for another model: delete {wip} to start {stage} over")
    state = trainer.load(ckpt)
    state["checkpoint"] = ckpt.name
    return state


def all_reduce_grads(model: torch.nn.Module, world_size: int) -> None:
    """Average gradients over ranks (after accumulation; every rank then takes the same step)."""
    handles = [torch.distributed.all_reduce(p.grad, async_op=True) for p in model.parameters() if p.grad is not None]
    for h in handles:
        h.wait()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(world_size)


def optimizer_step(model, optimizers, grad_clip: float, rt) -> None:
    """All-reduce (several ranks), clip (when > 0), step every optimizer, clear gradients."""
    if rt.distributed:
        all_reduce_grads(model, rt.world_size)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def commit(out_dir: Path, weights, model_config: dict, stage: str, step: int, tokenizer_dir: Path,
           files: dict[str, object] | None = None) -> None:
    """The checkpoint artifact: weights (a module or a name → tensor dict), model.json (config, step, stage), the tokenizer, and JSON `files`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_weights(weights, out_dir / checkpoint.WEIGHTS)
    (out_dir / "model.json").write_text(json.dumps({"model": model_config, "step": step, "stage": stage}, indent=1, sort_keys=True))
    # the tokenizer travels with the weights: a pulled checkpoint is all a chat needs
    shutil.copytree(tokenizer_dir, out_dir / "tokenizer", ignore=shutil.ignore_patterns("manifest.json", "compression.md"))
    for name, value in (files or {}).items():
        (out_dir / name).write_text(json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False))


class StopRequest:
    """SIGTERM (preemption, Prefect cancel) asks for a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, *_):
        self.requested = True

    def flag(self, device) -> torch.Tensor:
        """This rank's request as a float tensor, to be summed over ranks with other per-step values."""
        return torch.tensor(1.0 if self.requested else 0.0, device=device)

    def settle(self, summed: float) -> bool:
        """Whether to stop now, the same answer on every rank, from `flag` summed over ranks. A signal that
        arrived after `flag` was read stays requested and is agreed on at the next step."""
        if summed > 0:
            self.requested = True
        return summed > 0

    def agreed(self, rt) -> bool:
        """Whether any rank got SIGTERM, the same answer on every rank: the signal can reach the ranks on either side
        of a step boundary, and a checkpoint is a collective that all of them must enter at the same step."""
        if not rt.distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=rt.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested
