"""Per-rank memory of the training engines, measured: torch (replicated) against DeepSpeed ZeRO 1, 2 and 3.

    python bench/zero_memory.py                  # d12 dims (depth 12, width 768, vocab 65,536), 2 processes
    python bench/zero_memory.py --depth 2        # a quick look (about a minute; d12 takes ~6 minutes on 2 cores)
    python bench/zero_memory.py --nproc 4 --engines zero2 zero3

Each engine runs in a fresh `torchrun --nproc_per_node N` (CPU, gloo) so nothing of one engine is left in the
next. Every rank builds the real GPT (fp32, as the CPU trains) and the real optimizers (model/nn/optim.py), wraps
them in the real engine (model/train/engine.py, model/train/zero.py) and takes two steps of 1 × 64 random tokens:
the first creates the optimizer state, the second is measured between backward and the optimizer step, when
gradients and optimizer state both exist. Nothing is computed from a formula: the bytes are those of the tensors
found on each rank, each storage counted once, in the first category that claims it:

  params      the model weights this rank holds (ZeRO 1/2: the flat buffer every parameter points into; ZeRO-3:
              this rank's partitions, `param.ds_tensor`, plus any parameter gathered at that moment)
  master      ZeRO's fp32 copy of this rank's partition (stage 1/2 `single_partition_of_fp32_groups`, stage 3
              `fp32_partitioned_groups_flat`): storage of its own only where it does not share the params'
  opt state   the optimizer's state tensors: AdamW exp_avg + exp_avg_sq (embedding, head), Muon momentum_buffer
              (block matrices). torch engine: `optimizer.state`; ZeRO: the basic optimizer's state of this
              rank's flat partitions (`zero_optimizer.optimizer.state`)
  staging     ZeRO 1/2 only: the Muon momentum staged for the step in flight (`_muon_pending_momentum`), a second
              buffer the size of this rank's Muon momentum, kept between steps
  grads       gradients held after backward: `param.grad`, and every tensor under a ZeRO attribute named *grad* or
              *ipg* (stage 1/2 `averaged_gradients`, stage 3 `grad_partitions_flat_buffer` and the reduce bucket
              `ipg_buckets`). Transient peaks are not in it: the full `param.grad`s during backward before ZeRO 1/2
              reduce them, the flat fp32 gradient of one partition group built inside the step.
  other       every other tensor reachable from the ZeRO optimizer object (Muon all-gather caches, ...)

`--detail` lists each rank's largest storages and where they were found.

Under each engine two expected rows, Ψ = Ψ_adam + Ψ_muon parameters, N processes, fp32 (4 bytes):

  paper   the ZeRO paper's accounting: params 4Ψ (ZeRO-3: 4Ψ/N); grads 4Ψ (ZeRO-2, 3: 4Ψ/N); optimizer state
          8Ψ_adam + 4Ψ_muon, / N under every ZeRO stage; master 4Ψ/N (DeepSpeed keeps an fp32 copy of the partition
          even when the parameters already are fp32)
  ds0.19  the same plus what DeepSpeed 0.19's code does (read from runtime/zero/stage_1_and_2.py, stage3.py):
          - ZeRO 1/2 give Muon whole matrices, so the momentum covers every matrix touching the partition (≈ Ψ_muon/N,
            plus the one matrix cut by the boundary), and a staging copy of it is kept between steps (+4Ψ_muon/N);
          - after backward, ZeRO 1 and 2 alike hold the reduced gradient of every parameter touching the partition,
            whole (the full `param.grad`s are dropped); embed and lm_head are each a group of one tensor (their own
            LRs), so every rank keeps their whole gradient; and Muon's orthogonalized update of this rank's matrices
            is computed at that point too (`averaged_gradients`): grads 4Ψ_adam + 4Ψ_muon/N + 4Ψ_muon/N, which
            is neither the paper's ZeRO-1 4Ψ nor its ZeRO-2 4Ψ/N (at N = 2 it happens to equal 4Ψ). On a GPU
            (bf16 weights, fp32 accumulation) the AdamW groups take a compact buffer of the partition only;
          - ZeRO-3 keeps its reduce bucket (reduce_bucket_size elements, deploy/deepspeed/zero3.json) allocated:
            grads 4Ψ/N + 4·reduce_bucket_size; its Muon all-gather cache shows as "other".
GB = 1e9 bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("torch", "zero1", "zero2", "zero3")
COLUMNS = ("params", "master", "opt_state", "staging", "grads", "other")
MARK = "ZERO_MEMORY_RESULT "
VOCAB = 65536
TOKENS = 64


# ---------------------------------------------------------------- measuring (inside torchrun)

class Ledger:
    """Storages seen so far, each in the first category that claimed it."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = {c: 0 for c in COLUMNS}
        self.items: list[tuple[int, str, str]] = []  # (bytes, category, where found), for --detail

    def claim(self, category: str, t, where: str = "") -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in self.seen:
            return
        self.seen.add(ptr)
        self.bytes[category] += size
        self.items.append((size, category, where))


def walk(obj, path: str, visit, seen: set[int], depth: int = 0) -> None:
    """Every tensor reachable from `obj` through containers and DeepSpeed objects (not nn.Modules), with the
    attribute path it was found under."""
    import torch

    if depth > 12 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        visit(obj, path)
        if obj.grad is not None:
            visit(obj.grad, path + ".grad")
        ds = getattr(obj, "ds_tensor", None)
        if isinstance(ds, torch.Tensor):
            visit(ds, path + ".ds_tensor")
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            walk(v, f"{path}[{k!r}]" if isinstance(k, (str, int)) else f"{path}[*]", visit, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in list(obj):
            walk(v, path + "[]", visit, seen, depth + 1)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for k, v in list(vars(obj).items()):
            walk(v, f"{path}.{k}", visit, seen, depth + 1)


def measure_torch(model, trainer) -> Ledger:
    led = Ledger()
    for name, p in model.named_parameters():
        led.claim("params", p, name)
    for opt in trainer.optimizers:
        for state in opt.state.values():
            for k, v in state.items():
                led.claim("opt_state", v, f"{type(opt).__name__}.state[{k}]")
    for name, p in model.named_parameters():
        led.claim("grads", p.grad, name + ".grad")
    return led


def measure_zero(model, trainer) -> Ledger:
    zopt = trainer.ds.optimizer
    led = Ledger()
    for name, p in model.named_parameters():
        led.claim("params", p.data, name)
        led.claim("params", getattr(p, "ds_tensor", None), name + ".ds_tensor")
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for i, t in enumerate(getattr(zopt, attr, None) or []):
            led.claim("master", t, f"{attr}[{i}]")
    for state in zopt.optimizer.state.values():
        for k, v in state.items():
            led.claim("opt_state", v, f"optimizer.state[{k}]")
    for i, v in (getattr(zopt, "muon_momentum_buffer_partitioned_groups_flat", None) or {}).items():
        led.claim("opt_state", v, f"muon_momentum_buffer_partitioned_groups_flat[{i}]")  # ZeRO-3, when kept apart
    for i, (staged, _) in (getattr(zopt, "_muon_pending_momentum", None) or {}).items():
        led.claim("staging", staged, f"_muon_pending_momentum[{i}]")
    for name, p in model.named_parameters():
        led.claim("grads", p.grad, name + ".grad")

    def visit(t, path: str) -> None:
        low = path.lower()
        led.claim("grads" if ("grad" in low or "ipg" in low) else "other", t, path)

    walk(zopt, "zero", visit, set())
    return led


def worker(engine_name: str, depth: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    from model.config import BaseConfig
    from model.nn.gpt import GPT, GPTConfig
    from model.nn.optim import build_optimizers
    from model.train import engine, runtime

    ds = engine_name != "torch"
    cfg = BaseConfig(depth=depth, max_seq_len=2048, device_batch_size=1, total_batch_size=TOKENS, grad_clip=0.0 if ds else 1.0,
                     engine="deepspeed" if ds else "torch", zero_config=engine_name if ds else "zero2", device="cpu")
    rt = runtime.init("cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_base(cfg, VOCAB))
    optimizers = build_optimizers(model, cfg, rt.world_size)
    counts = {"psi": model.num_params(),
              "psi_adam": sum(p.numel() for g in optimizers[0].param_groups for p in g["params"]),
              "psi_muon": sum(p.numel() for o in optimizers[1:] for g in o.param_groups for p in g["params"])}
    trainer = engine.make(model, optimizers, cfg, rt, accum=1, micro_batch=1, stage="base")
    gen = torch.Generator().manual_seed(rt.rank)
    t0 = time.perf_counter()
    found = None
    for step in range(2):
        trainer.schedule(1.0, 0.95)
        x = torch.randint(0, VOCAB, (1, TOKENS), generator=gen)
        y = torch.randint(0, VOCAB, (1, TOKENS), generator=gen)
        loss = trainer.forward(x, y)
        if ds:
            trainer.ds.backward(loss)  # reduces the gradients at the boundary; the optimizer step is ds.step()
        else:
            trainer.backward(loss)
        if step == 1:
            found = measure_zero(model, trainer) if ds else measure_torch(model, trainer)
        if ds:
            trainer.ds.step()
        else:
            trainer.step()
    top = sorted(found.items, reverse=True)[:12]
    mine = {"rank": rt.rank, "bytes": found.bytes, "top": top, "seconds": time.perf_counter() - t0, **counts}
    everyone = [None] * rt.world_size
    dist.all_gather_object(everyone, mine)
    if rt.main:
        print(MARK + json.dumps({"engine": engine_name, "world_size": rt.world_size, "ranks": everyone}), flush=True)
    runtime.shutdown(rt)


# ---------------------------------------------------------------- driving (the parent process)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine_name: str, depth: int, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4().hex}",
           "--local-addr=127.0.0.1", str(Path(__file__).resolve()), "--worker", engine_name, "--depth", str(depth)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT),
           "DS_ACCELERATOR": "cpu"}
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    sys.exit(f"{engine_name}: torchrun exited {r.returncode} without a result\n{r.stderr[-4000:]}")


def zero_conf(engine_name: str) -> dict:
    return json.loads((ROOT / "deploy" / "deepspeed" / f"{engine_name}.json").read_text())["zero_optimization"]


def expected(engine_name: str, psi: int, psi_adam: int, psi_muon: int, n: int, paper: bool) -> dict:
    """Bytes per rank, fp32. paper: the ZeRO paper's accounting (state, gradients, parameters each / N from stage
    1, 2, 3 on). Otherwise what DeepSpeed 0.19's code implies on top of it (see the module docstring): whole-tensor
    gradients of the parameters touching a ZeRO 1/2 partition (embed and lm_head are each a group of one tensor, so
    every rank holds their whole gradient), the Muon staging copy, and ZeRO-3's persistent reduce bucket."""
    stage = 0 if engine_name == "torch" else int(engine_name[-1])
    state = 8 * psi_adam + 4 * psi_muon
    out = {
        "params": 4 * psi / (n if stage == 3 else 1),
        "master": 4 * psi / n if stage else 0,
        "opt_state": state / (n if stage else 1),
        "staging": 0,
        "grads": 4 * psi / (n if stage >= 2 else 1),
        "other": 0,
    }
    if paper or not stage:
        return out
    if stage in (1, 2):
        out["staging"] = 4 * psi_muon / n
        out["grads"] = 4 * psi_adam + 8 * psi_muon / n
    if stage == 3:
        out["grads"] += 4 * zero_conf(engine_name).get("reduce_bucket_size", 5e8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=12, help="model depth; width 64 × depth, vocab 65,536 (default 12)")
    ap.add_argument("--nproc", type=int, default=2, help="processes (ranks) per engine (default 2)")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--detail", action="store_true", help="also list each rank's largest storages and where they were found")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.depth)
    if any(e != "torch" for e in args.engines):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            sys.exit("deepspeed is not installed (pip install 'deepspeed>=0.18,<0.20'); run with --engines torch")

    results = {}
    for name in args.engines:
        t0 = time.perf_counter()
        results[name] = launch(name, args.depth, args.nproc)
        print(f"  {name}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    first = next(iter(results.values()))["ranks"][0]
    psi, psi_adam, psi_muon, n = first["psi"], first["psi_adam"], first["psi_muon"], args.nproc
    gb = 1e9
    print(f"per-rank memory, measured after backward and before the optimizer step: depth {args.depth} "
          f"(width {64 * args.depth}, vocab {VOCAB:,}), {n} processes on CPU (gloo), fp32, batch 1 × {TOKENS} tokens")
    print(f"Ψ = {psi:,} parameters: {psi_adam:,} AdamW (embed, lm_head) + {psi_muon:,} Muon (block matrices)")
    print("GB = 1e9 bytes. Rows 'paper': the ZeRO paper's accounting; 'ds0.19': the same with what DeepSpeed 0.19's code\n"
          "adds (whole-tensor gradients of the parameters in a ZeRO 1/2 partition, the Muon staging copy, ZeRO-3's reduce\n"
          "bucket); see the docstring. '× torch': total over the torch engine's measured total (paper rows: over its paper total).\n")
    head = f"{'engine':<8}{'rank':>6}" + "".join(f"{c.replace('_', ' '):>11}" for c in COLUMNS) + f"{'total':>10}{'× torch':>9}"
    print(head)
    print("-" * len(head))
    torch_total = None
    if "torch" in results:
        torch_total = max(sum(r["bytes"].values()) for r in results["torch"]["ranks"])
    exp_torch = sum(expected("torch", psi, psi_adam, psi_muon, n, True).values())
    for name, res in results.items():
        for r in sorted(res["ranks"], key=lambda r: r["rank"]):
            total = sum(r["bytes"].values())
            ratio = f"{total / torch_total:>9.2f}" if torch_total else f"{'':>9}"
            print(f"{name:<8}{r['rank']:>6}" + "".join(f"{r['bytes'][c] / gb:>11.3f}" for c in COLUMNS)
                  + f"{total / gb:>10.3f}" + ratio)
        for label, paper in (("paper", True), ("ds0.19", False)):
            if name == "torch" and not paper:
                continue
            e = expected(name, psi, psi_adam, psi_muon, n, paper)
            print(f"{'':<8}{label:>6}" + "".join(f"{e[c] / gb:>11.3f}" for c in COLUMNS)
                  + f"{sum(e.values()) / gb:>10.3f}{sum(e.values()) / exp_torch:>9.2f}")
    if args.detail:
        print("\nlargest storages per rank (MB, category, where found):")
        for name, res in results.items():
            for r in sorted(res["ranks"], key=lambda r: r["rank"]):
                print(f"  {name} rank {r['rank']}:")
                for size, cat, where in r["top"]:
                    print(f"    {size / 1e6:10.2f}  {cat:<10} {where}")
    print("\noptimizer state (AdamW m, v + Muon momentum) per rank, max over ranks: measured vs Ψ-accounting")
    for name, res in results.items():
        got = max(r["bytes"]["opt_state"] for r in res["ranks"])
        want = expected(name, psi, psi_adam, psi_muon, n, True)["opt_state"]
        print(f"  {name:<6} {got / gb:7.3f} GB measured, {want / gb:7.3f} GB expected "
              f"(8·{psi_adam:,} + 4·{psi_muon:,} bytes{'' if name == 'torch' else f' / {n}'}), ratio {got / want:.3f}")


if __name__ == "__main__":
    main()
