"""Whether `torch.compile` pays back within a run, decided before the first step from the plan alone.

compile costs a one-off C seconds (tracing and code generation, the training graph and the inference graph that
evaluation uses) and then saves a share of every step. It is on when

    planned steps × estimated saving per step > estimated compile seconds.

The decision uses only the config (planned steps, model shape, batch) and the device kind and thread count,
never a timing of this run: compiled and eager kernels round differently, so a resumed run must make the same
choice as the run it resumes (the planned total is used, not the steps left).

The CPU constants are measurements (bench/train_profile.py, torch 2.13, one thread of a 2-core AMD EPYC without
AVX-512; depth 2, width 128, vocab 4,096, 4,096-token steps): eager 1.10 CPU s per step, compiled 1.02 (7% less,
once glibc keeps freed memory, model/train/runtime.py), compile from a cold inductor cache 51 s for the training
graph and 19 s for the evaluation graph. So at that shape compile pays back after about 900 steps. The per-layer
part and the CUDA figures are estimates; an explicit `compile` wins.
"""
from __future__ import annotations

from dataclasses import dataclass

# Eager training FLOP/s per thread (CPU) or per device (CUDA): the eager step time is flops / this.
EAGER_FLOPS = {"cpu": 26e9, "cuda": 250e12}
# Share of the eager step that compilation removes (elementwise chains fused: norms, rotary, ReLU², the
# soft-capped logits and the loss).
SAVED_SHARE = {"cpu": 0.07, "cuda": 0.25}
# One-off compile seconds, cold cache, both graphs: a fixed part plus a part per layer (dynamo unrolls the blocks).
COMPILE_S = {"cpu": (40.0, 15.0), "cuda": (45.0, 1.5)}


@dataclass(frozen=True)
class Plan:
    on: bool
    compile_s: float
    saved_s: float
    steps: int
    why: str = ""

    def line(self) -> str:
        est = f"est. {self.compile_s:.0f} s compile, saves {self.saved_s:.0f} s over {self.steps} steps"
        if self.why:
            return f"compile: {'on' if self.on else 'off'} ({self.why})"
        return f"compile: {'on' if self.on else 'off'} ({est}{'' if self.on else ': does not pay back'})"


def plan(explicit: bool | None, device: str, threads: int, n_layer: int, flops_per_token: int, tokens_per_step: int,
         steps: int | None) -> Plan:
    """`explicit` (the config's compile) wins; None decides from the estimate; no planned steps: CUDA only."""
    kind = "cuda" if device == "cuda" else "cpu"
    fixed, per_layer = COMPILE_S[kind]
    compile_s = fixed + per_layer * n_layer
    rate = EAGER_FLOPS[kind] * (max(1, threads) if kind == "cpu" else 1)
    per_step = SAVED_SHARE[kind] * flops_per_token * tokens_per_step / rate
    saved = per_step * (steps or 0)
    if explicit is not None:
        return Plan(explicit, compile_s, saved, steps or 0, "set in the config")
    if steps is None:
        return Plan(kind == "cuda", compile_s, saved, 0, "no planned step count: on for CUDA, off on CPU")
    return Plan(saved > compile_s, compile_s, saved, steps)
