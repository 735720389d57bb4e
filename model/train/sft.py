"""Supervised fine-tuning: the `sft` stage's entry point (nanochat v0's chat_sft).

    python -m model.train.sft spec.json                      # one process
    torchrun --nproc_per_node N -m model.train.sft spec.json # N processes, one node

spec.json: {"config": SftConfig, "checkpoint_dir" (the mid checkpoint artifact), "data_dir" (the sft
conversations artifact), "out_dir", "wip_dir", "metrics_path"}.

The recipe, as nanochat v0's chat_sft.py:
- the mid checkpoint; fresh optimizers with the base groups at `init_lr_frac` (0.02) of the rates; the LR
  multiplier of step i is 1 − i/steps (linear to 0); Muon momentum from its (by default flat) warmup;
- one conversation per row, cut to the model's sequence_len + 1 tokens, rows padded to the micro-batch's
  longest, targets −1 where the render mask is 0 and on padding (model/data/chat_loader.py);
- steps: `num_iterations`, or num_epochs × (train conversations // examples_per_step) (≥ 1); each epoch is
  reshuffled with the seed;
- the loss of a micro-batch is the mean over its counted targets, divided by the number of micro-batches
  of the step (as nanochat);
- val loss on the first `eval_examples` val conversations at step 0, every eval_every steps and at the end:
  the mean over all their counted targets (v0 averaged per-batch means; this does not depend on batching).

Data streams: S = examples_per_step / device_batch_size; stream s takes conversations s·B … s·B+B−1 of each
global batch; a process of W takes streams r, r+W, … So N processes compute the steps of one, and a resume may
change N. Checkpoints and resume as mid and base (wip_dir, every checkpoint_every steps and on SIGTERM).
tokens/s counts the non-pad input tokens.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.config import SftConfig
from model.data.chat_loader import Conversations, PaddedBatches, padded_eval_batches
from model.errors import InputError
from model import preflight
from model.nn.optim import muon_momentum
from model.progress import progress
from model.train import common, engine, finetune, runtime

SAMPLE_TOKENS = 32


def horizon(cfg: SftConfig, conversations: int) -> int:
    return cfg.num_iterations or max(1, cfg.num_epochs * (conversations // cfg.examples_per_step))


def train(spec: dict) -> dict:
    cfg = runtime.parse_config(SftConfig, spec["config"], "sft")
    ckpt_dir, data_dir = Path(spec["checkpoint_dir"]), Path(spec["data_dir"])
    out_dir, wip = Path(spec["out_dir"]), Path(spec["wip_dir"])
    if common.checkpoint_stage(ckpt_dir) != "mid":  # the cheap check first: before joining any process group
        common.load_start(ckpt_dir, "sft", "cpu")  # raises the one-line error naming what it got
    train_set, val_set = Conversations(data_dir, "train"), Conversations(data_dir, "val")
    if len(train_set) == 0:
        raise InputError(f"the train split of {data_dir} has no conversations: SFT needs some; "
                         "rebuild the sft_data artifact with train entries")
    engine.check(cfg, "sft")  # before any process group or model exists
    rt = runtime.init(cfg.device)
    stop = common.StopRequest()
    torch.manual_seed(cfg.seed)

    if (shape := preflight.checkpoint_model(ckpt_dir)) is not None:  # rows' lengths come from the data: the model state
        preflight.check_training_memory("sft", shape, cfg.device_batch_size, 0, rt.device,
                                        batch_field="sft.device_batch_size", procs=rt.world_size)
    model, tok = common.load_start(ckpt_dir, "sft", rt.device)
    mcfg = model.config.to_dict()
    max_tokens = model.config.sequence_len + 1
    token_bytes = load_file(str(ckpt_dir / "tokenizer" / "token_bytes.safetensors"))["token_bytes"].long()
    n_streams = finetune.streams(cfg.examples_per_step, cfg.device_batch_size, rt.world_size,
                                 f"sft.examples_per_step {cfg.examples_per_step} / device_batch_size {cfg.device_batch_size}")
    mine = list(range(rt.rank, n_streams, rt.world_size))
    accum = len(mine)
    optimizers = common.build(model, cfg, rt.world_size)
    trainer = engine.make(model, optimizers, cfg, rt, accum, cfg.device_batch_size, "sft")
    steps = horizon(cfg, len(train_set))

    loop = {"curve": {"step": [], "train_loss": [], "lr_mult": [], "tokens": []}, "evals": [], "train_seconds": 0.0,
            "tokens": 0, "resumed_from": []}
    start_step, loader_states = 0, {}
    if (saved := common.resume(wip, trainer, mcfg, "sft")) is not None:
        start_step, loader_states, loop = saved["step"], saved["loaders"], saved["loop"]
        loop["resumed_from"].append(start_step)
        if rt.main:
            print(f"sft: resuming from {saved['checkpoint']} (step {start_step} of {steps})", file=sys.stderr, flush=True)
    loaders = {s: PaddedBatches(train_set, tok, s, n_streams, cfg.device_batch_size, max_tokens, cfg.seed,
                                state=loader_states.get(str(s)), device=rt.device) for s in mine}

    def save(step: int) -> None:
        states = finetune.gather_states(rt, {str(s): ld.state_dict() for s, ld in loaders.items()})
        trainer.save(wip, step, {"model": mcfg, "loaders": states, "loop": loop})

    def validate() -> dict:
        batches = padded_eval_batches(val_set, tok, cfg.device_batch_size, max_tokens, cfg.eval_examples,
                                      rt.rank, rt.world_size, rt.device)
        return finetune.evaluate(trainer.forward, batches, token_bytes, rt)

    bar = progress(total=steps, initial=start_step, desc="sft", unit="step", disable=not rt.main)
    timed_steps, timed_seconds, timed_tokens = 0, 0.0, 0
    step = start_step
    while True:
        last = step == steps
        if (step % cfg.eval_every == 0 or last) and len(val_set) and not any(e["step"] == step for e in loop["evals"]):
            with trainer.full_params():
                ev = validate()
            loop["evals"].append({"step": step, "val_loss": ev["loss"], "val_bpb": ev["bpb"]})
            if rt.main:
                loss = "n/a" if ev["loss"] is None else f"{ev['loss']:.4f}"
                print(f"sft: step {step}/{steps} val loss {loss}", file=sys.stderr, flush=True)
        if last:
            break

        t0 = time.perf_counter()
        mult = 1.0 - step / steps
        trainer.schedule(mult, muon_momentum(step, cfg))
        loss_sum = torch.zeros((), device=rt.device)
        tokens = 0
        for s in mine:
            x, y, n = loaders[s].next_batch()
            with rt.autocast():
                loss = finetune.mean_loss(trainer.forward, x, y)
            trainer.backward(loss)
            loss_sum += loss.detach()
            tokens += n
        trainer.step()
        loss_sum, tokens = rt.sum_across_ranks([loss_sum.item(), float(tokens)])
        train_loss, tokens = loss_sum / n_streams, int(tokens)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        loop["train_seconds"] += dt
        loop["tokens"] += tokens
        if step > start_step + 3:  # the first steps include warm-up
            timed_steps, timed_seconds, timed_tokens = timed_steps + 1, timed_seconds + dt, timed_tokens + tokens
        loop["curve"]["step"].append(step)
        loop["curve"]["train_loss"].append(train_loss)
        loop["curve"]["lr_mult"].append(mult)
        loop["curve"]["tokens"].append(tokens)
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{mult:.2f}", tok_s=f"{tokens / dt:,.0f}", refresh=False)
        bar.update(1)
        if stop.agreed(rt) or step % cfg.checkpoint_every == 0:
            save(step)
            if stop.requested:
                bar.close()
                print(f"sft: SIGTERM: checkpoint at step {step}; rerun to resume", file=sys.stderr, flush=True)
                runtime.shutdown(rt)
                sys.exit(143)
    bar.close()

    if timed_steps == 0:  # a short run: every step counted, warm-up included
        timed_seconds, timed_tokens = loop["train_seconds"], sum(loop["curve"]["tokens"])
    evals = [e for e in loop["evals"] if e["val_loss"] is not None]
    metrics = {
        "params": model.num_params(), "steps": steps, "examples": steps * cfg.examples_per_step,
        "epochs": steps * cfg.examples_per_step / len(train_set), "tokens": loop["tokens"],
        "train_conversations": len(train_set), "val_conversations": len(val_set), "streams": n_streams,
        "world_size": rt.world_size, "train_loss": loop["curve"]["train_loss"][-1] if loop["curve"]["train_loss"] else None,
        "val_loss": evals[-1]["val_loss"] if evals else None, "first_val_loss": evals[0]["val_loss"] if evals else None,
        "min_val_loss": min(e["val_loss"] for e in evals) if evals else None,
        "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None,
        "train_seconds": loop["train_seconds"], "resumed_from": loop["resumed_from"],
        "device": rt.device_name(), "device_type": rt.device_type(),
    }
    if rt.main or trainer.lockstep:  # under ZeRO-3 every rank runs the same forwards
        with trainer.full_params():
            samples = finetune.chat_samples(model, tok, SAMPLE_TOKENS)
    weights = trainer.weights()
    if rt.main:
        common.commit(out_dir, weights, mcfg, "sft", steps, ckpt_dir / "tokenizer",
                      {"curve.json": {"train": loop["curve"], "val": loop["evals"]}, "samples.json": samples})
    runtime.shutdown(rt)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return runtime.main("sft", "model.train.sft", train, argv)


if __name__ == "__main__":
    sys.exit(main())
