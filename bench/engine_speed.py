"""Inference speed of the KV-cache engine on this machine's device: prefill and decode tokens/s.

    python bench/engine_speed.py                                  # depth 4, head_dim 64, vocab 4096, batch 1 and 8
    python bench/engine_speed.py --depth 20 --head-dim 128 --vocab 65536 --prompt-len 1024 --batches 1 8 32
    CHATFORGE_CODE=/path/to/old/checkout python bench/engine_speed.py     # the same figures for another checkout

For each batch size B: B distinct random prompts of --prompt-len tokens, then --decode-tokens sampled tokens
per row (temperature 1). Prefill tokens/s = B × prompt length / time to the first yielded step (the prefill
plus the first sample); decode tokens/s = B × (decode tokens − 1) / time of the remaining steps (one
forward of B tokens each, plus sampling). The best of --repeats runs is shown, after one warm-up run.
The last row is the engine-less baseline, `GPT.generate` (recomputes the whole context at every token), at batch 1.

Random weights; a stand-in tokenizer whose special ids lie outside the vocabulary, so no row stops early and
every run decodes exactly --decode-tokens tokens per row. bf16 autocast on CUDA, fp32 on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

# CHATFORGE_CODE: another checkout to measure (a before/after table runs this same script on both)
sys.path.insert(0, os.environ.get("CHATFORGE_CODE") or str(Path(__file__).resolve().parents[1]))

from model.config import SPECIAL_TOKENS, BaseConfig  # noqa: E402
from model.chat.engine import Engine  # noqa: E402
from model.nn.gpt import GPT, GPTConfig  # noqa: E402
from model.train.runtime import init  # noqa: E402


class StandInTokenizer:
    """Special ids vocab, vocab + 1, ...: never sampled, so rows run to max_tokens."""

    def __init__(self, vocab: int):
        self._ids = {name: vocab + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.bos_id = self._ids["<|bos|>"]

    def special_id(self, name: str) -> int:
        return self._ids[name]

    def encode(self, text: str) -> list[int]:
        return []

    def decode(self, ids) -> str:
        return ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(engine: Engine, prompts: list[list[int]], decode_tokens: int, rt) -> tuple[float, float]:
    """Seconds to the first step (prefill), seconds for the other steps (decode)."""
    sync(rt.device)
    t0 = time.perf_counter()
    with rt.autocast():
        steps = engine.generate(prompts, decode_tokens, temperature=1.0)
        next(steps)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in steps)
    sync(rt.device)
    t2 = time.perf_counter()
    assert n == decode_tokens, f"expected {decode_tokens} steps, got {n}"
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4, help="layers (width = depth × --aspect-ratio)")
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--n-kv-head", type=int, default=None, help="key/value heads (default: as many as query heads)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--baseline-tokens", type=int, default=16, help="tokens for the no-cache baseline (0: skip it)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (decode_bN, prefill_bN tokens/s) instead of the table")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    rt = init("auto")
    seq = args.prompt_len + args.decode_tokens
    base = BaseConfig(depth=args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                      n_kv_head=args.n_kv_head, max_seq_len=max(seq, 8))
    cfg = GPTConfig.from_base(base, args.vocab)
    torch.manual_seed(0)
    model = GPT(cfg).to(rt.device).eval()
    with torch.no_grad():  # zero-initialised head/projections would make every logit 0: give them weights
        for name, p in model.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.normal_(0, 0.02)
    engine = Engine(model, StandInTokenizer(args.vocab))
    gen = torch.Generator().manual_seed(0)

    def prompts(batch: int) -> list[list[int]]:
        return torch.randint(0, args.vocab, (batch, args.prompt_len), generator=gen).tolist()

    figures: dict[str, float] = {}
    say = (lambda *a, **k: None) if args.json else print
    say(f"device: {rt.device_name()}  threads {torch.get_num_threads()}  depth {cfg.n_layer}  width {cfg.n_embd}  "
          f"heads {cfg.n_head}/{cfg.n_kv_head} kv  vocab {cfg.vocab_size}  params {model.num_params():,}")
    say(f"prompt {args.prompt_len} tokens, {args.decode_tokens} decoded tokens per row, best of {args.repeats}")
    say(f"{'':<22} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>9}")
    run_engine(engine, prompts(1), 4, rt)  # warm-up (allocator, kernels)
    for batch in args.batches:
        runs = [run_engine(engine, prompts(batch), args.decode_tokens, rt) for _ in range(args.repeats)]
        prefill = min(r[0] for r in runs)
        decode = min(r[1] for r in runs)
        steps = args.decode_tokens - 1
        figures[f"decode_b{batch}"] = batch * steps / decode
        figures[f"prefill_b{batch}"] = batch * args.prompt_len / prefill
        say(f"{'engine (KV cache)':<22} {batch:>5} {batch * args.prompt_len / prefill:>14,.0f} "
              f"{batch * steps / decode:>13,.0f} {1000 * decode / steps:>9.2f}", flush=True)
    if args.baseline_tokens > 0 and not args.json:
        prompt = prompts(1)[0]
        sync(rt.device)
        t0 = time.perf_counter()
        with rt.autocast():
            n = sum(1 for _ in model.generate(prompt, args.baseline_tokens, temperature=1.0))
        sync(rt.device)
        dt = time.perf_counter() - t0
        print(f"{'no cache (GPT.generate)':<22} {1:>5} {'':>14} {n / dt:>13,.0f} {1000 * dt / n:>9.2f}")
    if args.json:
        print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
