"""Mid-training: the `mid` stage's entry point (nanochat v0's mid-training).

    python -m model.train.mid spec.json                      # one process
    torchrun --nproc_per_node N -m model.train.mid spec.json # N processes, one node

spec.json: {"config": MidConfig, "checkpoint_dir" (the base checkpoint artifact), "data_dir" (the mid
conversations artifact), "out_dir", "wip_dir", "metrics_path"}.

The recipe, as nanochat v0's mid_train.py:
- the base checkpoint, at its own sequence length (sequence_len); fresh optimizers with the base groups
  (Muon for block matrices, AdamW for embedding and head) at `init_lr_frac` of the rates; Muon momentum
  warming up from muon_momentum_start to muon_momentum_end over muon_momentum_warmup steps;
- the train conversations rendered and packed into one token stream (model/data/chat_loader.py), loss on
  every token (`mask_loss` restricts it to the assistant's tokens);
- steps: `num_iterations`, or one epoch: the train split's rendered tokens // total_batch_size (≥ 1);
- LR multiplier 1, then linear to 0 over the last `warmdown_ratio` of the steps (the multiplier of step i
  is (steps − i)/D for i > steps − D, D = round(warmdown_ratio · steps)). nanochat v0's mid-training
  multiplier rose with progress, a bug fixed upstream; this is the fixed, intended schedule;
- val loss and bits-per-byte on the val conversations (packed the same way, eval_tokens of them) at step 0,
  every eval_every steps and at the end (v0 reports bpb only).

bf16 autocast on CUDA, fp32 on CPU (model/train/runtime.py); torch.compile on CUDA unless `compile` says otherwise.
A conversation packs across rows, so none is cut; a conversation the renderer refuses, or one longer than
model/data/chat_loader.py's MAX_CONVERSATION_CHARS, and an empty train split are one-line InputErrors.

Data streams as base: the global batch is S = total_batch_size / (device_batch_size · sequence_len) streams;
stream s packs conversations s, s+S, …; a process of W takes streams r, r+W, … and accumulates them, so N
processes compute the steps of one, and a resume may change N. Checkpoints (weights, optimizers, RNG, loader
positions, curves) every checkpoint_every steps and on SIGTERM go to wip_dir; a rerun resumes from the newest
and computes the same losses as an uninterrupted run.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.config import MidConfig
from model.data.chat_loader import Conversations, PackedStream, packed_eval_batches
from model.errors import InputError
from model.nn.optim import muon_momentum
from model.progress import progress
from model import preflight
from model.train import common, engine, finetune, runtime

SAMPLE_TOKENS = 32


def lr_multiplier(step: int, steps: int, warmdown_ratio: float) -> float:
    """1 up to and including step steps − D, then (steps − step)/D (D = round(warmdown_ratio · steps))."""
    warmdown = round(warmdown_ratio * steps)
    if step <= steps - warmdown:
        return 1.0
    return max(0.0, (steps - step) / warmdown)


def train(spec: dict) -> dict:
    cfg = runtime.parse_config(MidConfig, spec["config"], "mid")
    ckpt_dir, data_dir = Path(spec["checkpoint_dir"]), Path(spec["data_dir"])
    out_dir, wip = Path(spec["out_dir"]), Path(spec["wip_dir"])
    if common.checkpoint_stage(ckpt_dir) != "base":  # the cheap check first: before joining any process group
        common.load_start(ckpt_dir, "mid", "cpu")  # raises the one-line error naming what it got
    train_set, val_set = Conversations(data_dir, "train"), Conversations(data_dir, "val")
    if len(train_set) == 0:
        raise InputError(f"the train split of {data_dir} has no conversations: mid-training needs some; "
                         "rebuild the mid_data artifact with train entries")
    engine.check(cfg, "mid")  # before any process group or model exists
    rt = runtime.init(cfg.device)
    stop = common.StopRequest()
    torch.manual_seed(cfg.seed)

    if (shape := preflight.checkpoint_model(ckpt_dir)) is not None:
        preflight.check_training_memory("mid", shape, cfg.device_batch_size, shape.sequence_len, rt.device,
                                        batch_field="mid.device_batch_size", procs=rt.world_size)
    model, tok = common.load_start(ckpt_dir, "mid", rt.device)
    mcfg = model.config.to_dict()
    T = model.config.sequence_len
    token_bytes = load_file(str(ckpt_dir / "tokenizer" / "token_bytes.safetensors"))["token_bytes"].long()
    n_streams = finetune.streams(cfg.total_batch_size, cfg.device_batch_size * T, rt.world_size,
                                 f"mid.total_batch_size {cfg.total_batch_size} / (device_batch_size {cfg.device_batch_size} "
                                 f"× the model's sequence_len {T})")
    mine = list(range(rt.rank, n_streams, rt.world_size))
    accum = len(mine)
    optimizers = common.build(model, cfg, rt.world_size)
    trainer = engine.make(model, optimizers, cfg, rt, accum, cfg.device_batch_size, "mid")

    loop = {"curve": {"step": [], "train_loss": [], "lr_mult": []}, "evals": [], "train_seconds": 0.0, "resumed_from": []}
    start_step, loader_states = 0, {}
    if (saved := common.resume(wip, trainer, mcfg, "mid")) is not None:
        start_step, loader_states, loop = saved["step"], saved["loaders"], saved["loop"]
        loop["resumed_from"].append(start_step)
    loaders = {s: PackedStream(train_set, tok, s, n_streams, cfg.device_batch_size, T, cfg.mask_loss,
                               state=loader_states.get(str(s)), device=rt.device) for s in mine}
    epoch_tokens = int(rt.sum_across_ranks([float(sum(len(ld.tokens) for ld in loaders.values()))])[0])
    steps = cfg.num_iterations or max(1, epoch_tokens // cfg.total_batch_size)
    if rt.main and saved is not None:
        print(f"mid: resuming from {saved['checkpoint']} (step {start_step} of {steps})", file=sys.stderr, flush=True)
    fwd = trainer.forward

    def save(step: int) -> None:
        states = finetune.gather_states(rt, {str(s): ld.state_dict() for s, ld in loaders.items()})
        trainer.save(wip, step, {"model": mcfg, "loaders": states, "loop": loop})

    # the val rows, rendered once (on the CPU; a batch moves to the device when it is evaluated)
    val_rows = list(packed_eval_batches(val_set, tok, cfg.device_batch_size, T, cfg.eval_tokens // rt.world_size,
                                        rt.rank, rt.world_size, cfg.mask_loss))

    def validate() -> dict:
        batches = ((x.to(rt.device), y.to(rt.device)) for x, y in val_rows)
        return finetune.evaluate(fwd, batches, token_bytes, rt)

    bar = progress(total=steps, initial=start_step, desc="mid", unit="step", disable=not rt.main)
    timed_steps, timed_seconds = 0, 0.0
    step = start_step
    while True:
        last = step == steps
        if (step % cfg.eval_every == 0 or last) and len(val_set) and not any(e["step"] == step for e in loop["evals"]):
            with trainer.full_params():
                ev = validate()
            loop["evals"].append({"step": step, "val_loss": ev["loss"], "val_bpb": ev["bpb"]})
            if rt.main:
                print(f"mid: step {step}/{steps} val loss {_fmt(ev['loss'])} bpb {_fmt(ev['bpb'])}", file=sys.stderr, flush=True)
        if last:
            break

        t0 = time.perf_counter()
        mult = lr_multiplier(step, steps, cfg.warmdown_ratio)
        trainer.schedule(mult, muon_momentum(step, cfg))
        loss_sum = torch.zeros((), device=rt.device)
        for s in mine:
            x, y = loaders[s].next_batch()
            with rt.autocast():
                loss = finetune.mean_loss(fwd, x, y)
            trainer.backward(loss)
            loss_sum += loss.detach()
        trainer.step()
        train_loss = rt.all_reduce_sum(loss_sum).item() / n_streams
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        loop["train_seconds"] += dt
        if step > start_step + 3:  # the first steps include compilation and warm-up
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + dt
        loop["curve"]["step"].append(step)
        loop["curve"]["train_loss"].append(train_loss)
        loop["curve"]["lr_mult"].append(mult)
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{mult:.2f}", tok_s=f"{cfg.total_batch_size / dt:,.0f}", refresh=False)
        bar.update(1)
        if stop.agreed(rt) or step % cfg.checkpoint_every == 0:
            save(step)
            if stop.requested:
                bar.close()
                print(f"mid: SIGTERM: checkpoint at step {step}; rerun to resume", file=sys.stderr, flush=True)
                runtime.shutdown(rt)
                sys.exit(143)
    bar.close()

    if timed_steps == 0:  # a short run: every step counted, warm-up included
        timed_steps, timed_seconds = len(loop["curve"]["step"]), loop["train_seconds"]
    tps = cfg.total_batch_size * timed_steps / timed_seconds if timed_seconds else None
    fpt, peak = model.flops_per_token(), rt.peak_flops()
    evals = [e for e in loop["evals"] if e["val_loss"] is not None]
    metrics = {
        "params": model.num_params(), "steps": steps, "tokens": steps * cfg.total_batch_size, "epoch_tokens": epoch_tokens,
        "epochs": steps * cfg.total_batch_size / epoch_tokens, "train_conversations": len(train_set),
        "val_conversations": len(val_set), "sequence_len": T, "streams": n_streams, "world_size": rt.world_size,
        "mask_loss": cfg.mask_loss, "train_loss": loop["curve"]["train_loss"][-1] if loop["curve"]["train_loss"] else None,
        "val_loss": evals[-1]["val_loss"] if evals else None, "val_bpb": evals[-1]["val_bpb"] if evals else None,
        "first_val_loss": evals[0]["val_loss"] if evals else None, "first_val_bpb": evals[0]["val_bpb"] if evals else None,
        "min_val_loss": min(e["val_loss"] for e in evals) if evals else None,
        "min_val_bpb": min((e["val_bpb"] for e in evals if e["val_bpb"] is not None), default=None),
        "tokens_per_s": tps, "step_seconds": timed_seconds / timed_steps if timed_steps else None,
        "mfu": fpt * tps / (peak * rt.world_size) if (peak and tps) else None,
        "train_seconds": loop["train_seconds"], "resumed_from": loop["resumed_from"],
        "device": rt.device_name(), "device_type": rt.device_type(), "compiled": trainer.compiled,
    }
    if rt.main or trainer.lockstep:  # under ZeRO-3 every rank runs the same forwards
        with trainer.full_params():
            samples = finetune.chat_samples(model, tok, SAMPLE_TOKENS)
    weights = trainer.weights()
    if rt.main:
        common.commit(out_dir, weights, mcfg, "mid", steps, ckpt_dir / "tokenizer",
                      {"curve.json": {"train": loop["curve"], "val": loop["evals"]}, "samples.json": samples})
    runtime.shutdown(rt)
    return metrics


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def main(argv: list[str] | None = None) -> int:
    return runtime.main("mid", "model.train.mid", train, argv)


if __name__ == "__main__":
    sys.exit(main())
