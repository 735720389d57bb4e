"""Process, device and precision setup shared by every training/eval entry point (single process or torchrun)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

# Dense bf16 peak FLOP/s per device, for MFU. Other devices: MFU not reported.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """bf16 autocast on CUDA; full fp32 on CPU (bf16 matmuls on CPU are slow and change results)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def device_type(self) -> str:
        """Short type for the ledger's price table (H100, A100, cpu, ...)."""
        name = self.device_name()
        for short in PEAK_FLOPS:
            if short in name:
                return short
        return "cpu" if self.device.type == "cpu" else name

    def peak_flops(self) -> float | None:
        return PEAK_FLOPS.get(self.device_type())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_across_ranks(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few counts (float64, so integer counts stay exact)."""
        return self.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()


def init(device: str = "auto") -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device and join the process group."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        from model.errors import InputError

        raise InputError("device is 'cuda' but no CUDA device is visible: set the stage's device to auto or cpu (e.g. --set base.device=auto)")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
        keep_freed_memory()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Runtime(rank, world, local, dev)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks for reuse instead of returning them to the OS. Its default serves
    blocks over 32 MB (a 4 × 512 × 4,096 fp32 logits tensor and its gradients) with a fresh mmap each time, so
    every step page-faults them in again: measured 40% of an eager CPU step at depth 2 (system time). A no-op
    where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GB come from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GB of freed heap
    except (OSError, AttributeError):
        pass


def parse_config(cls, raw: dict, section: str):
    """`cls.model_validate(raw)`, a validation failure as a one-line InputError naming `section.field`."""
    from pydantic import ValidationError

    from model.config import one_line
    from model.errors import InputError

    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise InputError(one_line(e, section)) from None


def main(stage: str, module: str, run: Callable[[dict], dict], argv: list[str] | None = None) -> int:
    """A stage's entry point `python -m <module> spec.json`: run(spec) → metrics, which rank 0 writes to the
    spec's `metrics_path` and prints; an InputError is one `<stage>: error: ...` line and exit status 1."""
    import json
    import sys
    from pathlib import Path

    from model.errors import InputError

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    try:
        metrics = run(spec)
    except InputError as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        if spec.get("metrics_path"):
            Path(spec["metrics_path"]).write_text(json.dumps(metrics, sort_keys=True))
        print(json.dumps(metrics, sort_keys=True))
    return 0


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        # every rank leaves together: a rank that tore gloo down while rank 0 was still committing aborted
        # once ("terminate called without an active exception", 1 run in ~12 of the ZeRO tests)
        dist.barrier()
        dist.destroy_process_group()
