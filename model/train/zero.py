"""The deepspeed engine: ZeRO stage 1, 2 or 3 (deploy/deepspeed/zero{1,2,3}.json or a file of yours) with
DeepSpeed's built-in Muon (`"optimizer": {"type": "Muon"}`, DeepSpeed >= 0.18).

What DeepSpeed does, read from its source (0.19), and how this engine keeps the recipe:

- **The split.** `deepspeed.initialize` tags every parameter: Muon for those with >= 2 dimensions whose names
  contain neither "embed" nor "lm_head", AdamW (DeepSpeed's FusedAdam) for the rest. The torch engine's rule is
  "2-D matrices under blocks. → Muon, embed.weight and lm_head.weight → AdamW"; on our GPT the two land on the
  same parameters, and `DeepSpeedTrainer` checks that they do (an error, never a silent change, if a model
  ever made them differ). The groups handed to DeepSpeed are the torch engine's own, with their initial LRs
  (the (width/768)^-0.5 scale of the AdamW groups included), betas, eps and Muon momentum.
- **LR and momentum each step.** ZeRO 1/2 read every group's "lr" and "momentum" at each step, so `schedule`
  writes them there. ZeRO-3 reads the Muon momentum once, at start-up, into `optimizer.muon_beta` and ignores
  the groups' value after that: `schedule` writes `muon_beta` too, so the warmup takes effect under ZeRO-3.
- **Newton–Schulz.** DeepSpeed's "standard" iteration is the recipe's (quintic, Keller Jordan's coefficients,
  bf16 on CUDA); on a CPU it would run in bf16 too, slowly and less exactly than the torch engine's fp32, so
  on a CPU the engine takes DeepSpeed's "gram" form (the same polynomial iterated on X·Xᵀ) where it runs in
  fp32 (CPUs without fp16 matrix units), which matches the torch engine to float rounding.
- **Clipping.** ZeRO applies Muon while it reduces the gradients, so DeepSpeed's `gradient_clipping` clips the
  norm of the orthogonalized *update* (with the AdamW gradients), not the raw gradient as the recipe does.
  That norm is about sqrt(Σ min(rows, cols)) over the matrices (≈ 300 at d20), so a clip of 1.0 would shrink
  every step ~300×. The config therefore refuses `grad_clip` > 0 with this engine; accumulation and averaging are DeepSpeed's.
- **Compilation.** DeepSpeed `torch.compile`s its Muon kernels. With `compile` off (the CPU default) the
  process runs them eagerly (`torch._dynamo` disabled), as nothing else is compiled either.
- **Checkpoints.** DeepSpeed's `save_checkpoint` (one file of optimizer partitions per rank) into a shared
  temporary directory that rank 0 renames to `step-N`, beside `state.json` (step, loaders, curves, world size,
  ZeRO stage) and rank 0's RNG state. They are read back with `torch.load(weights_only=True)` and an allowlist
  of DeepSpeed's plain data classes (its own loader unpickles everything). A resume on another number of
  processes or another ZeRO stage is refused with the supported path named: ZeRO partitions are per rank.
- **The committed artifact** is the consolidated fp32 weights (`safe_get_full_fp32_param`, gathered on every
  rank), the same safetensors file the torch engine commits.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import socket
import sys
import warnings
from pathlib import Path

import torch

from model.errors import InputError
from model.nn import checkpoint
from model.train import engine

BUNDLED = Path(__file__).resolve().parents[2] / "deploy" / "deepspeed"
# Set by chatforge from the stage's config; a ZeRO file that sets them would silently fight the recipe.
OWNED = ("optimizer", "scheduler", "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
         "gradient_clipping", "bf16", "fp16", "data_types")
TAG = "deepspeed"


def zero_file(ref: str) -> Path:
    return BUNDLED / f"{ref}.json" if ref in ("zero1", "zero2", "zero3") else Path(ref).expanduser()


def load_config(ref: str, stage: str) -> dict:
    """The ZeRO config `ref` names (zero1/zero2/zero3 or a path), checked: a one-line InputError otherwise."""
    field, path = f"{stage}.zero_config", zero_file(ref)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{field}: cannot read {path} ({e.strerror or e}): name zero1, zero2, zero3 or a readable JSON file") from None
    except ValueError as e:
        raise InputError(f"{field}: {path} is not valid JSON ({e}): fix the file, or use zero1, zero2 or zero3") from None
    zero = raw.get("zero_optimization") if isinstance(raw, dict) else None
    if not isinstance(zero, dict) or zero.get("stage") not in (1, 2, 3):
        raise InputError(f'{field}: {path} needs "zero_optimization": {{"stage": 1, 2 or 3, ...}}: see deploy/deepspeed/zero2.json')
    if owned := [k for k in OWNED if k in raw]:
        raise InputError(f"{field}: {path} sets {', '.join(owned)}, which chatforge sets from the {stage} config "
                         "(optimizer, batch, clipping, precision): remove them from the file")
    if zero["stage"] == 3 and zero.get("reduce_scatter", True):
        raise InputError(f'{field}: {path} is ZeRO-3 with reduce_scatter on, which DeepSpeed\'s Muon cannot use: '
                         'set "reduce_scatter": false in its zero_optimization')
    return raw


def ns_method(device: torch.device) -> str:
    """DeepSpeed's Newton–Schulz form: the recipe's bf16 "standard" on accelerators; on a CPU "gram" where it runs
    in fp32 (it does unless the CPU has fp16 matrix units)."""
    if device.type != "cpu":
        return "standard"
    from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

    return "gram" if ns_compute_dtype("gram") == torch.float32 else "standard"


def _join(rt) -> None:
    """DeepSpeed's communication layer over the process group runtime.init made (or a one-process one)."""
    import deepspeed

    if rt.world_size == 1 and "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", str(rt.local_rank))
    deepspeed.init_distributed(dist_backend="nccl" if rt.device.type == "cuda" else "gloo", verbose=False)


@contextlib.contextmanager
def _safe_loads():
    """DeepSpeed's checkpoint reads through torch.load(weights_only=True), allowing only its plain data classes."""
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as tce
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = tce.TorchCheckpointEngine.load

    def load(self, path, map_location=None):
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    tce.TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        tce.TorchCheckpointEngine.load = original


class DeepSpeedTrainer:
    name = "deepspeed"

    def __init__(self, model, optimizers, cfg, rt, accum: int, micro_batch: int, stage: str, compile_model: bool):
        conf = load_config(cfg.zero_config, stage)
        if rt.device.type == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed's first import picks CUDA on a GPU machine
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated")  # DeepSpeed's call, not ours
        import deepspeed
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
        if not compile_model:
            torch._dynamo.config.disable = True
        self.model, self.rt, self.stage, self.compiled = model, rt, stage, compile_model
        self.zero_stage = conf["zero_optimization"]["stage"]
        self.lockstep = self.zero_stage == 3  # a forward gathers the partitions: every rank runs it
        adamw, muon = optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        groups, self.initial_lr = [], {}
        for kind, opt in (("adam", adamw), ("muon", muon)):
            for i, g in enumerate(opt.param_groups if opt is not None else []):
                name = f"{kind}{i}"
                groups.append({"params": list(g["params"]), "lr": g["initial_lr"], "name": name})
                self.initial_lr[f"{name}-{kind}-params"] = g["initial_lr"]
        torch_muon = {id(p) for p in (muon.param_groups[0]["params"] if muon else [])}
        params = {
            "betas": list(adamw.defaults["betas"]), "eps": adamw.defaults["eps"], "weight_decay": 0.0,
            "momentum": muon.defaults["momentum"] if muon else 0.95, "ns_method": ns_method(rt.device),
        }
        ds_conf = {
            **conf,
            "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accum,
            "train_batch_size": micro_batch * accum * rt.world_size,
            "optimizer": {"type": "Muon", "params": params}, "gradient_clipping": 0.0, "steps_per_print": 2**62,
        }
        if rt.device.type == "cuda":
            ds_conf.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
        _join(rt)
        self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_conf)
        wrong = [n for n, p in model.named_parameters() if bool(getattr(p, "use_muon", False)) != (id(p) in torch_muon)]
        if wrong:
            raise InputError(f"DeepSpeed's Muon/AdamW split differs from the torch engine's on {', '.join(wrong)}: "
                             "rename the parameters (Muon: 2-D, no 'embed' or 'lm_head' in the name) or use engine=torch")
        if compile_model:
            self.ds.compile()
        self.forward = self.ds
        self.ns_method = params["ns_method"]
        if rt.main:
            print(f"{stage}: engine deepspeed, ZeRO-{self.zero_stage} ({cfg.zero_config}) on {rt.world_size} process(es), "
                  f"Muon Newton–Schulz '{self.ns_method}', gradient accumulation {accum}", file=sys.stderr, flush=True)

    def schedule(self, lr_mult: float, momentum: float) -> None:
        for g in self.ds.optimizer.param_groups:
            g["lr"] = self.initial_lr[g["name"]] * lr_mult
            if g["use_muon"]:
                g["momentum"] = momentum
        if hasattr(self.ds.optimizer, "muon_beta"):  # ZeRO-3 reads its Muon beta from here, not from the groups
            self.ds.optimizer.muon_beta = momentum

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # divides by the accumulation steps; averages over ranks at the boundary
        self.ds.step()  # a no-op until the last micro-batch of the step

    def step(self) -> None:
        """The step itself ran in the last micro-batch's backward (DeepSpeed steps at its accumulation boundary)."""
        if self.ds.micro_steps % self.ds.gradient_accumulation_steps():
            raise RuntimeError(f"deepspeed engine: {self.ds.micro_steps} micro-batches is not a whole number of steps")

    def full_params(self):
        """Under ZeRO-3 the full weights on every rank (evaluation and samples); a no-op otherwise."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def state_extra(self) -> dict:
        return {"engine": "deepspeed", "zero_stage": self.zero_stage, "world_size": self.rt.world_size}

    def save(self, wip: Path, step: int, state: dict) -> None:
        def write(tmp: Path) -> None:
            self.ds.save_checkpoint(str(tmp), tag=TAG, save_latest=False)
            if self.rt.main:
                torch.save({"rng": checkpoint.rng_state()}, tmp / "rng.pt")
                checkpoint.write_state(tmp, step, {**state, **self.state_extra()})

        engine.atomic_dir(wip, step, self.rt, write)

    def load(self, ckpt: Path) -> dict:
        state = checkpoint.read_state(ckpt)
        if state.get("engine", "torch") != "deepspeed":
            raise InputError(f"checkpoint {ckpt} was written by the torch engine: resume it with {self.stage}.engine=torch, "
                             f"or delete {ckpt.parent} to start over with deepspeed")
        was = (state.get("world_size"), state.get("zero_stage"))
        if was != (self.rt.world_size, self.zero_stage):
            raise InputError(
                f"checkpoint {ckpt} holds ZeRO-{was[1]} partitions of {was[0]} process(es); this run is ZeRO-{self.zero_stage} "
                f"on {self.rt.world_size}: resume with the same process count and zero_config (or engine=torch, whose "
                f"checkpoints resume on any count), or delete {ckpt.parent} to start over")
        try:
            with _safe_loads():
                path, _ = self.ds.load_checkpoint(str(ckpt), tag=TAG, load_lr_scheduler_states=False)
            rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)["rng"]
        except (OSError, RuntimeError, ValueError, KeyError, AssertionError, pickle.UnpicklingError) as e:
            raise InputError(f"checkpoint {ckpt} is corrupt or unreadable ({type(e).__name__}): delete it to resume from "
                             "an older one or start over") from None
        if path is None:
            raise InputError(f"checkpoint {ckpt} has no DeepSpeed state: delete it to resume from an older one or start over")
        checkpoint.set_rng_state(rng)
        return state

    def weights(self) -> dict[str, torch.Tensor]:
        """The full fp32 weights, on rank 0 (every rank must call: under ZeRO they are gathered)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p)
            if self.rt.main:
                out[name] = full.detach().to("cpu", torch.float32).clone()
        return out
