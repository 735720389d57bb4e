"""Training speed and peak memory of the engines on one device: torch against DeepSpeed ZeRO 1, 2 and 3.

    python bench/zero_gpu.py                                            # d12 and d20 on the GPU, every engine
    python bench/zero_gpu.py --depth 20 --batch 32 --steps 20           # one size, more steps
    python bench/zero_gpu.py --device cpu --depth 2 --seq 64 --steps 2  # CPU smoke (what the tests' machine can run)

One process (ZeRO on one process partitions nothing, but runs DeepSpeed's code path: its Muon, its bf16 master
weights, its buckets, so the speed and memory it costs show). Each row runs in a fresh child process, so a row's
peak memory is its own and DeepSpeed's global state never leaks into the next row. The real model and optimizers
(model/nn/gpt.py, model/nn/optim.py) inside the real engines (model/train/engine.py, zero.py), as base training
drives them: bf16 autocast on CUDA, torch.compile on CUDA (--compile), the recipe's grad_clip 1.0 for the torch
engine and 0 for deepspeed (which cannot clip, see zero.py). Random tokens: speed does not depend on the text.
The first --warmup steps (compilation, allocator) are not timed.

tokens/s = batch × seq / mean step time; MFU = flops_per_token × tokens/s / peak, with the model's own
flops_per_token (6 per non-embedding parameter + attention) and runtime.PEAK_FLOPS (989e12 for H100/H200 bf16
dense); none on a CPU. peak GB: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on a CPU.

Without DeepSpeed installed the ZeRO rows are skipped with a message and the torch rows still run (exit 0).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("torch", "zero1", "zero2", "zero3")
MARK = "ZERO_GPU_RESULT "


def row(args) -> dict:
    """One engine at one depth, in this process."""
    import resource

    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    from model.config import BaseConfig
    from model.nn.gpt import GPT, GPTConfig
    from model.nn.optim import build_optimizers
    from model.train import engine, runtime

    ds = args.row != "torch"
    rt = runtime.init(args.device)
    cuda = rt.device.type == "cuda"
    compile_model = {"on": True, "off": False, "auto": None}[args.compile]  # None: the stage's default (CUDA only)
    head_dim = args.head_dim or (64 if args.depth_one < 8 else 128)
    cfg = BaseConfig(depth=args.depth_one, head_dim=head_dim, max_seq_len=args.seq, device_batch_size=args.batch,
                     total_batch_size=args.batch * args.seq, grad_clip=0.0 if ds else 1.0,
                     engine="deepspeed" if ds else "torch", zero_config=args.row if ds else "zero2",
                     device="cuda" if cuda else "cpu", compile=compile_model)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_base(cfg, args.vocab)).to(rt.device)
    n_params, fpt = model.num_params(), model.flops_per_token()
    optimizers = build_optimizers(model, cfg)
    trainer = engine.make(model, optimizers, cfg, rt, accum=1, micro_batch=args.batch, stage="base")
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=rt.device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=rt.device)
    times, loss = [], None
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.schedule(1.0, 0.95)
        with rt.autocast():
            loss = trainer.forward(x, y)
        trainer.backward(loss)
        trainer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = sum(times) / len(times)
    tps = args.batch * args.seq / dt
    peak_flops = rt.peak_flops()
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated(rt.device)
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"params": n_params, "vocab": args.vocab, "flops_per_token": fpt, "step_s": dt, "tok_s": tps,
            "mfu": fpt * tps / peak_flops if peak_flops else None, "peak_bytes": peak_bytes,
            "loss": float(loss.detach().float()), "device": rt.device_name(), "compiled": trainer.compiled}


def have_deepspeed() -> bool:
    try:
        return importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        return False


def run_child(depth: int, engine_name: str, args) -> dict:
    vocab = args.vocab or (4096 if depth < 8 else 65536)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", engine_name, "--depth", str(depth),
           "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--vocab", str(vocab), "--device", args.device, "--compile", args.compile]
    if args.head_dim:
        cmd += ["--head-dim", str(args.head_dim)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    err = (r.stderr or r.stdout).strip().splitlines()
    oom = any("OutOfMemoryError" in line or "out of memory" in line for line in err)
    return {"error": "out of memory" if oom else f"exit {r.returncode}: {err[-1] if err else 'no output'}",
            "oom": oom, "tail": "\n".join(err[-30:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, nargs="+", default=[12, 20], help="model depths (default: 12 20)")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 32 on CUDA, the presets' "
                    "device_batch_size; 4 on a CPU)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on a CPU)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: 65,536; 4,096 below depth 8, as "
                    "bench/train_speed.py)")
    ap.add_argument("--head-dim", type=int, default=None, help="default: 64 below depth 8, else 128 (the presets')")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on for CUDA)")
    ap.add_argument("--row", choices=ENGINES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.batch = args.batch or (32 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.row:
        args.depth_one = args.depth[0]
        print(MARK + json.dumps(row(args)), flush=True)
        return 0

    engines = list(args.engines)
    if any(e != "torch" for e in engines) and not have_deepspeed():
        print("deepspeed is not importable here: skipping the ZeRO rows (pip install 'deepspeed>=0.18,<0.20' to run them); "
              "the torch rows still run", flush=True)
        engines = [e for e in engines if e == "torch"]
    print(f"seq {args.seq}, batch {args.batch} ({args.batch * args.seq:,} tokens a step), {args.steps} timed steps "
          f"after {args.warmup} warm-up, one process, device {args.device}", flush=True)
    head = (f"{'depth':>5} {'engine':>7} {'vocab':>7} {'params':>13} {'step ms':>10} {'tokens/s':>12} {'MFU':>7} {'peak GB':>9} "
            f"{'loss':>7}  device")
    print(head)
    print("-" * len(head), flush=True)
    failed = False
    for depth in args.depth:
        for name in engines:
            r = run_child(depth, name, args)
            if "error" in r:
                print(f"{depth:>5} {name:>7}  {r['error']}", flush=True)
                if not r["oom"]:
                    failed = True
                    print(r["tail"], file=sys.stderr, flush=True)
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{depth:>5} {name:>7} {r['vocab']:>7,} {r['params']:>13,} {1000 * r['step_s']:>10.1f} {r['tok_s']:>12,.0f} {mfu:>7} "
                  f"{r['peak_bytes'] / 1e9:>9.2f} {r['loss']:>7.3f}  {r['device']}{' (compiled)' if r['compiled'] else ''}",
                  flush=True)
    print("peak GB: torch.cuda.max_memory_allocated on CUDA, peak RSS of the process on a CPU (GB = 1e9 bytes)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
