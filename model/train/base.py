"""Base pretraining: the `base` stage's entry point.

    python -m model.train.base spec.json                      # one process
    torchrun --nproc_per_node N -m model.train.base spec.json # N processes, one node

spec.json: {"config": BaseConfig, "dataset_dir", "tokenizer_dir", "out_dir", "wip_dir", "metrics_path"}.

The global batch is split into S = total_batch_size / (device_batch_size · max_seq_len) data streams,
each a loader over its own stride of row groups; each process takes streams rank, rank+W, … and
accumulates their gradients. So the data a step sees does not depend on the number of processes:
N processes reproduce one process (up to float rounding), and a resume may change N.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.nn import checkpoint
from model import preflight
from model.train import common, engine, runtime
from model.evals.bpb import evaluate_bpb
from model.config import BaseConfig
from model.errors import InputError
from model.progress import progress
from model.nn.gpt import GPT, GPTConfig
from model.data.loader import TokenLoader, default_threads, iter_eval_batches
from model.nn.optim import build_optimizers, lr_multiplier, muon_momentum
from model.data.tokenizer import Tokenizer

PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def horizon(cfg: BaseConfig, num_params: int, flops_per_token: int) -> int:
    """Optimizer steps: explicit iterations > a FLOPs target > tokens = ratio × parameters."""
    if cfg.num_iterations:
        return cfg.num_iterations
    if cfg.target_flops:
        return max(1, round(cfg.target_flops / (flops_per_token * cfg.total_batch_size)))
    return max(1, round(cfg.target_param_data_ratio * num_params / cfg.total_batch_size))


def streams(cfg: BaseConfig, world_size: int) -> int:
    micro = cfg.device_batch_size * cfg.max_seq_len
    if cfg.total_batch_size % micro or (cfg.total_batch_size // micro) % world_size:
        raise InputError(
            f"base.total_batch_size {cfg.total_batch_size} is not a multiple of device_batch_size × max_seq_len × nproc "
            f"= {cfg.device_batch_size} × {cfg.max_seq_len} × {world_size}: change one of them so it divides"
        )
    return cfg.total_batch_size // micro


def train(spec: dict) -> dict:
    cfg = runtime.parse_config(BaseConfig, spec["config"], "base")
    dataset_dir, tokenizer_dir = Path(spec["dataset_dir"]), Path(spec["tokenizer_dir"])
    out_dir, wip = Path(spec["out_dir"]), Path(spec["wip_dir"])
    engine.check(cfg, "base")  # before any process group or model exists
    rt = runtime.init(cfg.device)
    stop = common.StopRequest()
    torch.manual_seed(cfg.seed)

    tok = Tokenizer.load(tokenizer_dir)
    token_bytes = load_file(str(tokenizer_dir / "token_bytes.safetensors"))["token_bytes"].long()
    mcfg = GPTConfig.from_base(cfg, tok.vocab_size)
    preflight.check_training_memory("base", mcfg, cfg.device_batch_size, cfg.max_seq_len, rt.device, procs=rt.world_size,
                                    batch_field="base.device_batch_size", seq_field="base.max_seq_len",
                                    model_field=f"base.depth={cfg.depth}")
    model = GPT(mcfg).to(rt.device)
    optimizers = build_optimizers(model, cfg, rt.world_size)
    n_params, fpt = model.num_params(), model.flops_per_token()
    steps = horizon(cfg, n_params, fpt)
    n_streams = streams(cfg, rt.world_size)
    mine = list(range(rt.rank, n_streams, rt.world_size))
    accum = len(mine)
    trainer = engine.make(model, optimizers, cfg, rt, accum, cfg.device_batch_size, "base", steps=steps)

    loop = {"curve": {"step": [], "train_loss": [], "lr_mult": []}, "evals": [], "samples": [], "ema": 0.0, "train_seconds": 0.0, "resumed_from": []}
    start_step, loader_states = 0, {}
    if (ckpt := checkpoint.latest(wip)) is not None:
        made_for = checkpoint.read_state(ckpt)["model"]
        if made_for != mcfg.to_dict():
            diff = ", ".join(f"{k} {made_for.get(k)} vs {v}" for k, v in mcfg.to_dict().items() if made_for.get(k) != v)
            raise InputError(f"checkpoint {ckpt} was made for another model ({diff}; tokenizer or config changed): delete {wip} to start over")
        saved = trainer.load(ckpt)
        start_step, loader_states, loop = saved["step"], saved["loaders"], saved["loop"]
        loop["resumed_from"].append(start_step)
        if rt.main:
            print(f"base: resuming from {ckpt.name} (step {start_step} of {steps})", file=sys.stderr, flush=True)
    _check_row_groups(dataset_dir, n_streams)
    threads = cfg.loader_threads or default_threads(len(mine))
    loaders = {
        s: TokenLoader(dataset_dir, "train", tok, cfg.device_batch_size, cfg.max_seq_len, rank=s, world_size=n_streams,
                       state=loader_states.get(str(s)), threads=threads, device=str(rt.device))
        for s in mine
    }
    fwd = trainer.forward

    def save(step: int) -> None:
        states = {str(s): ld.state_dict() for s, ld in loaders.items()}
        if rt.distributed:
            gathered = [None] * rt.world_size
            torch.distributed.all_gather_object(gathered, states)
            states = {k: v for part in gathered for k, v in part.items()}
        trainer.save(wip, step, {"model": mcfg.to_dict(), "loaders": states, "loop": loop})

    val = []

    def val_bpb() -> float:
        if not val:
            val.extend(val_batches(dataset_dir, tok, cfg, rt))
        return evaluate_bpb(fwd, val, token_bytes, rt)

    bar = progress(total=steps, initial=start_step, desc="base", unit="step", disable=not rt.main)
    tokens_per_step = cfg.total_batch_size
    timed_steps, timed_seconds = 0, 0.0
    step = start_step
    while True:
        last = step == steps
        if step % cfg.eval_every == 0 or last:
            with trainer.full_params():
                bpb = val_bpb()
            if not any(e["step"] == step for e in loop["evals"]):
                loop["evals"].append({"step": step, "val_bpb": bpb})
            bar.set_postfix(val_bpb=f"{bpb:.4f}", refresh=False)
            if rt.main:
                print(f"base: step {step}/{steps} val bpb {bpb:.4f}", file=sys.stderr, flush=True)
        if (step % cfg.sample_every == 0 or last) and step > 0 and not any(s["step"] == step for s in loop["samples"]):
            if rt.main or trainer.lockstep:  # under ZeRO-3 every rank runs the same forwards
                with trainer.full_params():
                    made = samples(model, tok, cfg.sample_tokens)
                if rt.main:
                    loop["samples"].append({"step": step, "samples": made})
        if last:
            break

        t0 = time.perf_counter()
        trainer.schedule(lr_multiplier(step, steps, cfg), muon_momentum(step, cfg))
        loss_sum = torch.zeros((), device=rt.device)
        for s in mine:
            x, y = loaders[s].next_batch()
            with rt.autocast():
                loss = fwd(x, y)
            trainer.backward(loss)
            loss_sum += loss.detach()
        trainer.step()
        # the step's one host sync: the loss for the log, with the SIGTERM flag in the same all-reduce
        summed, stopping = rt.all_reduce_sum(torch.stack([loss_sum.float(), stop.flag(rt.device)])).tolist()
        train_loss = summed / n_streams
        dt = time.perf_counter() - t0
        step += 1
        loop["train_seconds"] += dt
        if step > start_step + 3:  # the first steps include compilation and warm-up
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + dt
        loop["ema"] = 0.9 * loop["ema"] + 0.1 * train_loss
        ema = loop["ema"] / (1 - 0.9 ** step)
        loop["curve"]["step"].append(step)
        loop["curve"]["train_loss"].append(train_loss)
        loop["curve"]["lr_mult"].append(lr_multiplier(step - 1, steps, cfg))
        tps = tokens_per_step / dt
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{loop['curve']['lr_mult'][-1]:.2f}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update(1)
        halt = stop.settle(stopping)
        if halt or step % cfg.checkpoint_every == 0:
            save(step)
            if halt:
                bar.close()
                print(f"base: SIGTERM: checkpoint at step {step}; rerun to resume", file=sys.stderr, flush=True)
                runtime.shutdown(rt)
                sys.exit(143)
    bar.close()

    tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds else None
    peak = rt.peak_flops()
    metrics = {
        "params": n_params, "flops_per_token": fpt, "steps": steps, "tokens": steps * tokens_per_step,
        "total_flops": fpt * steps * tokens_per_step, "streams": n_streams, "world_size": rt.world_size,
        "val_bpb": loop["evals"][-1]["val_bpb"], "min_val_bpb": min(e["val_bpb"] for e in loop["evals"]),
        "first_val_bpb": loop["evals"][0]["val_bpb"], "train_loss": loop["curve"]["train_loss"][-1] if steps else None,
        "tokens_per_s": tps, "step_seconds": timed_seconds / timed_steps if timed_steps else None,
        "mfu": (fpt * tps / (peak * rt.world_size)) if (peak and tps) else None,
        "train_seconds": loop["train_seconds"], "resumed_from": loop["resumed_from"],
        "device": rt.device_name(), "device_type": rt.device_type(), "compiled": trainer.compiled,
        **trainer.state_extra(),
    }
    weights = trainer.weights()
    if rt.main:
        common.commit(out_dir, weights, mcfg.to_dict(), "base", steps, tokenizer_dir,
                      {"curve.json": {"train": loop["curve"], "val": loop["evals"]}, "samples.json": loop["samples"]})
    runtime.shutdown(rt)
    return metrics


def val_batches(dataset_dir: Path, tok: Tokenizer, cfg: BaseConfig, rt) -> list:
    """This rank's val bpb batches, made once per run: every evaluation reads the same fixed pass
    (iter_eval_batches), so reading and tokenizing it again at each one is waste."""
    return list(iter_eval_batches(dataset_dir, tok, cfg.device_batch_size, cfg.max_seq_len,
                                  max_tokens=cfg.eval_tokens // rt.world_size, rank=rt.rank,
                                  world_size=rt.world_size, device=str(rt.device)))


def _check_row_groups(dataset_dir: Path, n_streams: int) -> None:
    import pyarrow.parquet as pq

    from model.data.dataset import list_shards

    groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p in list_shards(dataset_dir, "train"))
    if groups < n_streams:
        raise InputError(
            f"the train split has {groups} row group(s) but training reads {n_streams} data streams "
            "(total_batch_size / (device_batch_size × max_seq_len)), one row group each at least: "
            "use more text, a smaller data.row_group_size, or fewer streams"
        )


def samples(model: GPT, tok: Tokenizer, max_tokens: int) -> list[dict]:
    """Greedy continuations of the fixed PROMPTS (the same in training logs and in base_eval)."""
    out = []
    for prompt in PROMPTS:
        ids = [tok.bos_id, *tok.encode(prompt)]
        gen = list(model.generate(ids, max_tokens=max_tokens, temperature=0.0))
        out.append({"prompt": prompt, "completion": tok.decode(gen)})
    return out


def main(argv: list[str] | None = None) -> int:
    return runtime.main("base", "model.train.base", train, argv)


if __name__ == "__main__":
    sys.exit(main())
