"""Where a base-training step's time goes on this machine: forward, backward, optimizer, data loading,
evaluation (val bpb, amortized over `--eval-every` steps), other; ms/step, % and tokens/s.

    python bench/train_profile.py                          # depth 2, seq 512, 4,096-token steps, all cores
    python bench/train_profile.py --threads 1 --json       # one JSON object (for a side-by-side table)
    python bench/train_profile.py --stage --steps 60       # the real base entry point: share of the stage's
                                                           # wall time spent outside training steps
    CHATFORGE_CODE=/path/to/old/checkout python bench/train_profile.py --json    # the same, against older code

The step is the one base.py runs (engine.make's trainer, TokenLoader streams, gradient accumulation), on text
from ../shared/data/corpus tokenized by a BPE trained once and cached under --cache. Only APIs present since
commit dd83e28 are used; newer ones are detected. Timings on a shared machine are noisy: run it twice.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.environ.get("CHATFORGE_CODE") or str(Path(__file__).resolve().parents[1]))
CODE = Path(sys.path[0]).resolve()
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def inputs(cache: Path, vocab: int) -> tuple[Path, Path]:
    """A dataset (row groups of 64 documents) and a BPE tokenizer of `vocab` tokens, built once under `cache`."""
    from model.config import DataConfig, LocalSource, TokenizerConfig
    from model.data.dataset import build
    from model.data.tokenizer import train as train_tokenizer

    data, tok = cache / "data", cache / f"tok-{vocab}"
    if not (data / "manifest.ok").exists():
        if not CORPUS.is_dir():
            sys.exit(f"train_profile: no corpus at {CORPUS}: this bench reads ../shared/data/corpus/*.jsonl")
        data.mkdir(parents=True, exist_ok=True)
        build(DataConfig(sources=[LocalSource(paths=[str(CORPUS / "*.jsonl")])], row_group_size=64, val_fraction=0.05),
              data, download_dir=cache / "dl")
        (data / "manifest.ok").write_text("")
    if not (tok / "tokenizer.json").exists():
        tok.mkdir(parents=True, exist_ok=True)
        train_tokenizer(TokenizerConfig(vocab_size=vocab, max_chars=5_000_000, reference_encodings=[], report_max_chars=50_000),
                        data, tok, download_dir=None)
    return data, tok


def config(args):
    from model.config import BaseConfig

    return BaseConfig(depth=args.depth, head_dim=args.head_dim, max_seq_len=args.seq, device_batch_size=args.device_batch,
                      total_batch_size=args.batch, num_iterations=args.warmup + args.steps, eval_every=args.eval_every,
                      eval_tokens=args.eval_tokens, sample_every=10**6, checkpoint_every=10**6, device="cpu",
                      **({} if args.compile == "auto" else {"compile": args.compile == "on"}))


def make_trainer(engine, model, optimizers, cfg, rt, accum: int, steps: int):
    """engine.make across versions: newer ones take the planned steps (for the compile decision)."""
    params = inspect.signature(engine.make).parameters
    extra = {"steps": steps} if "steps" in params else {}
    return engine.make(model, optimizers, cfg, rt, accum, cfg.device_batch_size, "base", **extra)


def profile(args) -> dict:
    import torch
    from safetensors.torch import load_file

    from model.data.loader import TokenLoader, iter_eval_batches
    from model.data.tokenizer import Tokenizer
    from model.evals.bpb import evaluate_bpb
    from model.nn.gpt import GPT, GPTConfig
    from model.nn.optim import build_optimizers, lr_multiplier, muon_momentum
    from model.train import engine, runtime

    data, tok_dir = inputs(Path(args.cache), args.vocab)
    cfg = config(args)
    rt = runtime.init("cpu")
    torch.manual_seed(cfg.seed)
    tok = Tokenizer.load(tok_dir)
    token_bytes = load_file(str(tok_dir / "token_bytes.safetensors"))["token_bytes"].long()
    model = GPT(GPTConfig.from_base(cfg, tok.vocab_size))
    optimizers = build_optimizers(model, cfg)
    n_streams = cfg.total_batch_size // (cfg.device_batch_size * cfg.max_seq_len)
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    trainer = make_trainer(engine, model, optimizers, cfg, rt, n_streams, total)
    try:  # newer code sizes the read-ahead to the cores (loader_threads None)
        from model.data.loader import default_threads
    except ImportError:
        default_threads = None
    threads = cfg.loader_threads or default_threads(n_streams)
    loaders = [TokenLoader(data, "train", tok, cfg.device_batch_size, cfg.max_seq_len, rank=s, world_size=n_streams,
                           threads=threads, device="cpu") for s in range(n_streams)]
    setup_s = time.perf_counter() - t0
    for ld in loaders:  # one batch each, then let the read-ahead finish: the timed steps see the steady state
        ld.next_batch()
        for *_, job in getattr(ld, "_pending", []):
            getattr(job, "result", lambda: None)()
    fwd = trainer.forward
    from model.train import base

    cached = getattr(base, "val_batches", None)  # newer code makes the val pass once per run
    val = []

    def val_bpb() -> float:
        if cached is None:
            return evaluate_bpb(fwd, iter_eval_batches(data, tok, cfg.device_batch_size, cfg.max_seq_len,
                                                       max_tokens=cfg.eval_tokens, device="cpu"), token_bytes, rt)
        if not val:
            val.extend(cached(data, tok, cfg, rt))
        return evaluate_bpb(fwd, val, token_bytes, rt)

    phases = ["forward", "backward", "optimizer", "data", "evaluation", "other"]
    # wall and process-CPU seconds per phase: on a shared machine wall time includes waiting for a core,
    # CPU time does not (with one thread it is the step's work)
    split = {k: [0.0, 0.0] for k in phases}
    first_steps, first_eval = [], 0.0
    # wall and CPU seconds of this thread (with one torch thread: the step's compute, without the loaders'
    # background tokenization, which is reported amortized as data_tokenize_cpu_ms)
    clock = lambda: (time.perf_counter(), time.thread_time() if torch.get_num_threads() == 1 else time.process_time())  # noqa: E731

    for step in range(total):
        timed = step >= args.warmup
        phase = {k: [0.0, 0.0] for k in phases}

        def add(name, since):
            now = clock()
            phase[name][0] += now[0] - since[0]
            phase[name][1] += now[1] - since[1]
            return now

        start = t = clock()
        if step == 0:  # as base does; this first one makes the val pass (and compiles the eval graph)
            val_bpb()
            first_eval = time.perf_counter() - start[0]
            t = clock()
        trainer.schedule(lr_multiplier(step, total, cfg), muon_momentum(step, cfg))
        loss_sum = torch.zeros(())
        for ld in loaders:
            x, y = ld.next_batch()
            t = add("data", t)
            loss = fwd(x, y)
            t = add("forward", t)
            trainer.backward(loss)
            t = add("backward", t)
            loss_sum += loss.detach()
        trainer.step()
        t = add("optimizer", t)
        loss_sum.item()
        end = clock()
        for i in range(2):
            phase["other"][i] = (end[i] - start[i]) - sum(v[i] for v in phase.values())
        if timed:
            for k in phases:
                split[k][0] += phase[k][0]
                split[k][1] += phase[k][1]
        else:
            first_steps.append(end[0] - start[0])
    t = clock()
    val_bpb()  # a later evaluation, amortized over the steps between two of them
    split["evaluation"] = [(clock()[i] - t[i]) * args.steps / cfg.eval_every for i in range(2)]
    cpu = {k: 1000 * v[1] / args.steps for k, v in split.items()}
    tokenize_ms = tokenize_cpu_ms(data, tok, cfg.total_batch_size)
    split = {k: v[0] for k, v in split.items()}
    timed_total = sum(split.values())
    timed_cpu = sum(cpu.values()) / 1000 * args.steps - cpu["evaluation"] / 1000 * args.steps
    ms = {k: 1000 * v / args.steps for k, v in split.items()}
    step_ms = 1000 * timed_total / args.steps
    train_ms = step_ms - ms["evaluation"]
    result = {
        "code": str(CODE), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "shape": {"depth": cfg.depth, "head_dim": cfg.head_dim, "seq": cfg.max_seq_len, "batch_tokens": cfg.total_batch_size,
                  "device_batch": cfg.device_batch_size, "vocab": tok.vocab_size, "streams": n_streams},
        "compiled": bool(getattr(trainer, "compiled", False)), "steps": args.steps, "warmup_steps_s": [round(s, 3) for s in first_steps],
        "setup_s": round(setup_s, 3), "first_eval_s": round(first_eval, 2), "eval_every": cfg.eval_every, "eval_tokens": cfg.eval_tokens,
        "ms_per_step": {k: round(v, 2) for k, v in ms.items()},
        "pct": {k: round(100 * v / step_ms, 1) for k, v in ms.items()},
        "cpu_ms_per_step": {k: round(v, 2) for k, v in cpu.items()},
        "step_ms": round(step_ms, 2),
        "train_tokens_per_s": round(cfg.total_batch_size / (train_ms / 1000), 1),
        # process CPU seconds per training step (all threads): less sensitive than wall time to other load
        "train_cpu_ms": round(1000 * timed_cpu / args.steps, 2),
        "train_tokens_per_cpu_s": round(cfg.total_batch_size / timed_cpu * args.steps, 1),
        "data_tokenize_cpu_ms": round(tokenize_ms, 2),
        "tokens_per_s_with_eval": round(cfg.total_batch_size / (step_ms / 1000), 1),
    }
    if args.torch_profile:
        result["top_ops"] = top_ops(trainer, loaders, fwd, torch)
    for ld in loaders:
        ld.close()
    return result


def tokenize_cpu_ms(data: Path, tok, tokens: int) -> float:
    """CPU ms (all threads) to tokenize `tokens` tokens of the train split: the loaders' background work per step."""
    import pyarrow.parquet as pq

    from model.data.dataset import list_shards

    texts = pq.ParquetFile(list_shards(data, "train")[0]).read_row_group(0, columns=["text"]).column(0).to_pylist()
    t = time.process_time()
    n = sum(len(ids) + 1 for ids in tok.encode_batch(texts))
    return 1000 * (time.process_time() - t) * tokens / n


def top_ops(trainer, loaders, fwd, torch, steps: int = 3) -> list[dict]:
    """torch.profiler over a few steps: the operators with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile as tprofile, record_function

    batches = [[ld.next_batch() for ld in loaders] for _ in range(steps)]
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for micro in batches:
            for x, y in micro:
                with record_function("forward"):
                    loss = fwd(x, y)
                with record_function("backward"):
                    trainer.backward(loss)
            with record_function("optimizer"):
                trainer.step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2), "calls": e.count // steps}
            for e in rows]


def stage(args) -> dict:
    """Run `python -m model.train.base` on the shape for `--steps` steps; wall time vs time inside training steps."""
    data, tok = inputs(Path(args.cache), args.vocab)
    run = Path(args.cache) / f"stage-{os.getpid()}"
    (run / "out").mkdir(parents=True, exist_ok=True)
    raw = config(args).model_dump(mode="json")
    raw.update(num_iterations=args.steps, sample_every=args.sample_every, sample_tokens=args.sample_tokens)
    spec = {"config": raw, "dataset_dir": str(data), "tokenizer_dir": str(tok), "out_dir": str(run / "out"),
            "wip_dir": str(run / "wip"), "metrics_path": str(run / "metrics.json")}
    (run / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(CODE)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "model.train.base", str(run / "spec.json")], cwd=CODE, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"train_profile: base exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    m = json.loads((run / "metrics.json").read_text())
    inside = m["train_seconds"]
    compile_line = next((ln for ln in r.stderr.splitlines() if "compile:" in ln), None)
    return {"code": str(CODE), "steps": args.steps, "wall_s": round(wall, 2), "train_steps_s": round(inside, 2),
            "outside_s": round(wall - inside, 2), "outside_pct": round(100 * (wall - inside) / wall, 1),
            "tokens_per_s": m.get("tokens_per_s"), "compiled": m.get("compiled"), "val_bpb": m.get("val_bpb"),
            "compile_log": compile_line}


def show(r: dict) -> None:
    if "outside_pct" in r:
        print(f"base stage, {r['steps']} steps: wall {r['wall_s']:.1f} s, inside training steps {r['train_steps_s']:.1f} s, "
              f"outside {r['outside_s']:.1f} s ({r['outside_pct']:.1f}%), {r['tokens_per_s'] or 0:,.0f} tokens/s, "
              f"compiled={r['compiled']}")
        if r["compile_log"]:
            print(r["compile_log"])
        return
    s = r["shape"]
    print(f"code {r['code']}  torch {r['torch']}  threads {r['threads']}  compiled {r['compiled']}")
    print(f"depth {s['depth']} head_dim {s['head_dim']} seq {s['seq']} batch {s['batch_tokens']} tokens "
          f"({s['streams']} × {s['device_batch']} rows) vocab {s['vocab']}; {r['steps']} steps after warm-up "
          f"{r['warmup_steps_s']} s (the first with an evaluation of {r['first_eval_s']} s); "
          f"eval every {r['eval_every']} steps ({r['eval_tokens']} tokens)")
    print(f"{'phase':<11} {'ms/step':>9} {'%':>6} {'CPU ms':>9}")
    for k, v in r["ms_per_step"].items():
        print(f"{k:<11} {v:>9.1f} {r['pct'][k]:>6.1f} {r['cpu_ms_per_step'][k]:>9.1f}")
    print(f"{'step':<11} {r['step_ms']:>9.1f}")
    print(f"training tokens/s {r['train_tokens_per_s']:,.0f}   with evaluation {r['tokens_per_s_with_eval']:,.0f}   "
          f"per CPU second {r['train_tokens_per_cpu_s']:,.0f}\n"
          f"loaders' background tokenization, amortized: {r['data_tokenize_cpu_ms']:.1f} CPU ms/step")
    for row in r.get("top_ops", []):
        print(f"  {row['op']:<48} {row['self_ms_per_step']:>9.2f} ms/step  ×{row['calls']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4096, help="tokens per optimizer step")
    ap.add_argument("--device-batch", type=int, default=4, help="rows per forward (streams = batch / (rows × seq))")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (--stage: the stage's num_iterations)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--sample-every", type=int, default=10**6, help="--stage: steps between samples (and the last)")
    ap.add_argument("--sample-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--stage", action="store_true", help="run the real base entry point instead")
    ap.add_argument("--torch-profile", action="store_true", help="also list the top operators (torch.profiler)")
    ap.add_argument("--cache", default=os.environ.get("CHATFORGE_BENCH_CACHE", "/tmp/chatforge-bench"))
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the --stage child reads it
        import torch

        torch.set_num_threads(args.threads)
    r = stage(args) if args.stage else profile(args)
    print(json.dumps(r)) if args.json else show(r)


if __name__ == "__main__":
    main()
