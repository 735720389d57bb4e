"""Training throughput of the GPT at given depths on this machine's device: tokens/s, step time, MFU.

    python bench/train_speed.py                       # tiny preset dims, eager vs torch.compile, on CPU
    python bench/train_speed.py --depths 12 20 --seq 2048 --batch 32 --steps 10    # a GPU machine

Random tokens (the model's speed does not depend on the text); Muon + AdamW steps as in training;
the first `--warmup` steps (compilation, allocator warm-up) are not timed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

# CHATFORGE_CODE=/an/older/checkout runs the same bench against that code (a before/after table)
sys.path.insert(0, os.environ.get("CHATFORGE_CODE") or str(Path(__file__).resolve().parents[1]))

from model.config import BaseConfig  # noqa: E402
from model.nn.gpt import GPT, GPTConfig  # noqa: E402
from model.nn.optim import apply_schedules, build_optimizers  # noqa: E402
from model.train.runtime import init  # noqa: E402


def bench(depth: int, head_dim: int, seq: int, batch: int, vocab: int, steps: int, warmup: int, compile_: bool, rt) -> dict:
    cfg = BaseConfig(depth=depth, head_dim=head_dim, max_seq_len=seq, device_batch_size=batch, total_batch_size=batch * seq)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_base(cfg, vocab)).to(rt.device)
    opts = build_optimizers(model, cfg)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, vocab, (batch, seq), device=rt.device)
    y = torch.randint(0, vocab, (batch, seq), device=rt.device)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        apply_schedules(opts, step, warmup + steps, cfg)
        with rt.autocast():
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    dt = sum(times) / len(times)
    tps = batch * seq / dt
    peak = rt.peak_flops()
    return {"params": model.num_params(), "step_s": dt, "tok_s": tps,
            "mfu": model.flops_per_token() * tps / peak if peak else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[4], help="model depths (tiny preset: 4)")
    ap.add_argument("--head-dim", type=int, default=None, help="default: 64 below depth 8, else 128")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=None, help="default: 4096 below depth 8, else 65536")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", choices=["both", "on", "off"], default="both")
    args = ap.parse_args()
    rt = init("auto")
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    print(f"device: {rt.device_name()}  seq {args.seq}  batch {args.batch}  steps {args.steps} (+{args.warmup} warm-up)")
    print(f"{'depth':>5} {'params':>13} {'compile':>8} {'step ms':>9} {'tokens/s':>11} {'MFU':>7}")
    for depth in args.depths:
        hd = args.head_dim or (64 if depth < 8 else 128)
        vocab = args.vocab or (4096 if depth < 8 else 65536)
        for c in modes:
            r = bench(depth, hd, args.seq, args.batch, vocab, args.steps, args.warmup, c, rt)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
            print(f"{depth:>5} {r['params']:>13,} {'on' if c else 'off':>8} {1000 * r['step_s']:>9.1f} {r['tok_s']:>11,.0f} {mfu:>7}", flush=True)


if __name__ == "__main__":
    main()
