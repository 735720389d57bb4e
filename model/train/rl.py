"""Reinforcement learning: the `rl` stage's entry point. REINFORCE with a group-mean baseline, on-policy,
no KL — what nanochat v0's chat_rl does (no PPO/GRPO ratio clipping, no std normalization, no reference model).

    python -m model.train.rl spec.json                      # one process
    torchrun --nproc_per_node N -m model.train.rl spec.json # N processes, one node

spec.json: {"config": RlConfig, "checkpoint_dir" (an sft checkpoint artifact), "data_dir" (a conversations
artifact: train.parquet / val.parquet with `messages` (JSON), `source`, `answer`), "out_dir", "wip_dir",
"metrics_path"}.

One step (of `steps` = num_iterations, or num_epochs × train problems // examples_per_step, at least 1):

- the step's E = examples_per_step problems are positions step·E … step·E + E − 1 of the problem order
  (each epoch a permutation of the train split seeded with (seed, epoch)); process r of W takes positions
  r, r + W, … (E / W each), so W processes compute what one does;
- for each problem: prompt = `render_for_completion` of its conversation without the reference assistant
  turn; G = num_samples samples from the `Engine` (temperature, top_k, up to max_new_tokens, calculator
  tool use), in generation batches of device_batch_size, batch b seeded with
  sha256(seed, "train", step, problem row, b): a rerun (or a resume) samples the same tokens;
- reward r_i = 1 if `gsm8k_answer` of the sampled text `numbers_equal`s the reference answer, else 0;
  advantage A_i = r_i − mean(r_1..r_G) (the group mean is the baseline; no division by the std);
- per generation batch: sequences = prompt + sampled tokens, right-padded; target at position t = token
  t + 1 where the model sampled it (engine mask 1), −1 on the prompt, on forced tool output (mask 0) and
  on padding; then, with n_valid = the batch's targets ≠ −1, B = generation batches per problem and
  E_r = E / W problems per process,

      loss = − Σ_{i in batch, t valid} log p(target_{i,t}) · A_i  /  (n_valid · B · E_r)

  (nanochat v0's per-sampled-token normalization), backpropagated batch by batch; the gradients are
  averaged over processes, so the step's objective is the sum over its E problems / E;
- one optimizer step (Muon + AdamW from the sft weights, fresh state), every group's LR =
  init_lr_frac × its base rate × (1 − step / steps): linear to 0.

pass@k, every eval_every steps and at the end, on the first eval_examples problems of the val split (held
out from the *training* problems; never an eval set): k = min(pass_k, num_samples) samples each (seeds from
(seed, "eval", step, row, batch)); pass@j = the fraction of problems with a correct answer among their first
j samples, j = 1..k.

Artifact: the rl checkpoint (common.commit, stage "rl"), curve.json ({"train": per step mean reward, loss,
lr multiplier, tokens sampled; "eval": per eval step pass@1..pass@k}) and samples.json (a few rollouts:
question, reference, sampled texts and rewards). Resumable: a checkpoint every checkpoint_every steps and on
SIGTERM (weights, optimizer, loop state; sampling seeds are derived from the step, so nothing else is
needed), and a rerun resumes from the newest one with the same rewards and losses as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from model.chat.conversation import render_for_completion
from model.chat.engine import Engine
from model.config import RlConfig
from model.errors import InputError
from model.evals.chat_tasks import gsm8k_answer, numbers_equal
from model import preflight
from model.nn import checkpoint
from model.progress import progress
from model.nn.optim import muon_momentum
from model.train import common, runtime
from model.train.engine import TorchTrainer

ALGORITHM = "REINFORCE with a group-mean baseline, on-policy, no KL"
SAMPLES_PER_RECORD = 4  # rollouts kept in samples.json per recorded step


@dataclass
class Problem:
    index: int  # row in its split: seeds are derived from it
    prompt: list[int]
    answer: str
    question: str
    source: str


# ---------------------------------------------------------------- data

def read_split(data_dir: Path, split: str) -> list[dict]:
    """Rows {messages (JSON str), source, answer} of a conversations artifact's split."""
    import pyarrow.parquet as pq

    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        raise InputError(f"{path} does not exist: rl needs a conversations artifact with train.parquet and val.parquet")
    table = pq.read_table(path)
    missing = [c for c in ("messages", "answer") if c not in table.column_names]
    if missing:
        raise InputError(f"{path} has no {' or '.join(missing)} column: rl needs problems with checkable answers "
                         "(messages and answer columns)")
    return table.to_pylist()


def load_problems(data_dir: Path, split: str, tok, sequence_len: int) -> tuple[list[Problem], int]:
    """The split's problems with their prompts, and how many were left out because their prompt does not fit
    the model's context. A problem without an answer is an InputError: RL needs checkable answers."""
    rows = read_split(data_dir, split)
    unanswered = [i for i, row in enumerate(rows) if row.get("answer") is None or not str(row["answer"]).strip()]
    if unanswered:
        raise InputError(
            f"{len(unanswered)} of {len(rows)} {split} problems have no answer (first: row {unanswered[0]}, source "
            f"{rows[unanswered[0]].get('source')!r}): rl needs problems with checkable answers; use a problem mixture "
            "whose every row has an `answer`")
    problems, too_long = [], 0
    for i, row in enumerate(rows):
        try:
            messages = json.loads(row["messages"])
        except (TypeError, ValueError) as e:
            raise InputError(f"{split} row {i}: messages is not JSON ({e}): fix the conversations artifact") from None
        try:
            prompt = render_for_completion(messages, tok)
        except InputError as e:
            raise InputError(f"{split} row {i}: {e}") from None
        if len(prompt) >= sequence_len:
            too_long += 1
            continue
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        problems.append(Problem(i, prompt, str(row["answer"]).strip(), question, str(row.get("source") or "")))
    return problems, too_long


def problem_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of 0..n−1 (seeded with the run's seed and the epoch)."""
    order = list(range(n))
    random.Random(f"rl-order/{seed}/{epoch}").shuffle(order)
    return order


def step_positions(step: int, examples_per_step: int, n: int, seed: int) -> list[int]:
    """Indices (into the problem list) of the step's problems, in order."""
    out, orders = [], {}
    for pos in range(step * examples_per_step, (step + 1) * examples_per_step):
        epoch = pos // n
        if epoch not in orders:
            orders[epoch] = problem_order(n, seed, epoch)
        out.append(orders[epoch][pos % n])
    return out


def num_steps(cfg: RlConfig, n_problems: int) -> int:
    if cfg.num_iterations:
        return cfg.num_iterations
    return max(1, cfg.num_epochs * n_problems // cfg.examples_per_step)


# ---------------------------------------------------------------- rewards, advantages, loss

def reward(text: str, answer: str) -> float:
    """1.0 when the number after the last "####" of `text` equals the reference answer, else 0.0."""
    return 1.0 if numbers_equal(gsm8k_answer(text), answer) else 0.0


def advantages(rewards: Sequence[float]) -> list[float]:
    """reward − the group's mean reward (no std normalization)."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def rollout_batch(prompt: list[int], batch: Sequence[tuple[list[int], list[int]]], pad_id: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of one generation batch: rows prompt + sampled tokens, right-padded with `pad_id`;
    targets are the next token where the model sampled it (mask 1), −1 on the prompt, forced tool output and
    padding."""
    rows = [prompt + list(tokens) for tokens, _ in batch]
    masks = [[0] * len(prompt) + list(mask) for _, mask in batch]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        keep[i, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    targets = ids[:, 1:].clone()
    targets[~keep[:, 1:]] = -1
    return ids[:, :-1], targets


def pg_loss(nll: torch.Tensor, targets: torch.Tensor, advantage: torch.Tensor, num_batches: int,
            examples_per_rank: int) -> torch.Tensor:
    """−Σ log p(target)·A over the batch's valid targets / (n_valid · num_batches · examples_per_rank).

    `nll` (B, T) is the per-position negative log-likelihood of `targets` (−1: not a target); `advantage` (B,)."""
    valid = targets >= 0
    logp = torch.where(valid, -nll.float(), torch.zeros((), device=nll.device))
    objective = (logp * advantage.to(logp.device, torch.float32)[:, None]).sum()
    n_valid = valid.sum().clamp(min=1)
    return -objective / (n_valid * num_batches * examples_per_rank)


# ---------------------------------------------------------------- sampling and pass@k

def sample_seed(seed: int, phase: str, step: int, problem: int, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}/{phase}/{step}/{problem}/{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class Sampler:
    """G samples of one prompt from the Engine, in generation batches of `batch_size`, each batch seeded from
    (seed, phase, step, problem row, batch index)."""

    def __init__(self, engine: Engine, cfg: RlConfig, rt: runtime.Runtime):
        self.engine, self.cfg, self.rt = engine, cfg, rt
        self.seconds = 0.0

    def __call__(self, problem: Problem, n: int, phase: str, step: int) -> list[list[tuple[list[int], list[int]]]]:
        cfg, out = self.cfg, []
        t0 = time.perf_counter()
        for b, start in enumerate(range(0, n, cfg.device_batch_size)):
            with self.rt.autocast():
                out.append(self.engine.generate_batch(
                    [problem.prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                    seed=sample_seed(cfg.seed, phase, step, problem.index, b),
                    num_samples=min(cfg.device_batch_size, n - start)))
        self.seconds += time.perf_counter() - t0
        return out


def pass_at_k(problems: Sequence[Problem], texts: Callable[[Problem], list[str]], k: int, rt) -> list[float]:
    """[pass@1, …, pass@k] over `problems` (split over ranks): pass@j = the fraction of problems with at least
    one correct answer among the first j of the k texts `texts(problem)` returns."""
    hits = [0.0] * k
    for p in problems[rt.rank::rt.world_size]:
        correct = [reward(t, p.answer) > 0 for t in texts(p)[:k]]
        for j in range(k):
            hits[j] += any(correct[: j + 1])
    hits = rt.sum_across_ranks(hits)
    return [h / len(problems) for h in hits]


# ---------------------------------------------------------------- the stage

def train(spec: dict) -> dict:
    cfg = runtime.parse_config(RlConfig, spec["config"], "rl")
    ckpt_dir, data_dir = Path(spec["checkpoint_dir"]), Path(spec["data_dir"])
    out_dir, wip = Path(spec["out_dir"]), Path(spec["wip_dir"])
    rt = runtime.init(cfg.device)
    if cfg.examples_per_step % rt.world_size:
        raise InputError(f"rl.examples_per_step {cfg.examples_per_step} is not a multiple of the {rt.world_size} "
                         "processes: change one so that every process gets the same number of problems")
    stop = common.StopRequest()
    torch.manual_seed(cfg.seed)

    if (shape := preflight.checkpoint_model(ckpt_dir)) is not None:  # samples' lengths come from sampling: the model state
        preflight.check_training_memory("rl", shape, cfg.device_batch_size, 0, rt.device,
                                        batch_field="rl.device_batch_size", procs=rt.world_size)
    model, tok = common.load_start(ckpt_dir, "rl", rt.device)
    seq_len = model.config.sequence_len
    train_problems, long_train = load_problems(data_dir, "train", tok, seq_len)
    val_problems, long_val = load_problems(data_dir, "val", tok, seq_len)
    if not train_problems:
        raise InputError(f"no train problem has a prompt shorter than the model's context ({seq_len} tokens, "
                         f"{long_train} left out): use shorter problems or a model with a longer context")
    if not val_problems:
        raise InputError(f"the val split has no usable problem ({long_val} longer than the context of {seq_len}): "
                         "pass@k needs held-out training problems; give the problem mixture a val split")
    eval_problems = val_problems[: cfg.eval_examples]
    k = min(cfg.pass_k, cfg.num_samples)
    steps = num_steps(cfg, len(train_problems))
    per_rank = cfg.examples_per_step // rt.world_size
    num_batches = math.ceil(cfg.num_samples / cfg.device_batch_size)
    pad_id = tok.special_id("<|assistant_end|>")
    model_config = model.config.to_dict()

    optimizers = common.build(model, cfg, rt.world_size)
    loop = {"train": {"step": [], "mean_reward": [], "loss": [], "lr_mult": [], "tokens_sampled": [], "mean_length": []},
            "eval": [], "samples": [], "train_seconds": 0.0, "sample_seconds": 0.0, "sequences": 0, "tokens_sampled": 0,
            "resumed_from": []}
    start_step = 0
    # RL has the torch engine only: its steps are a few hundred problems, far from where ZeRO pays
    if (state := common.resume(wip, TorchTrainer(model, optimizers, cfg.grad_clip, rt, 1, False), model_config, "rl")) is not None:
        start_step, loop = state["step"], state["loop"]
        loop["resumed_from"].append(start_step)
        if rt.main:
            print(f"rl: resuming from {state['checkpoint']} (step {start_step} of {steps})", file=sys.stderr, flush=True)
    if rt.main:
        print(f"rl: {ALGORITHM}: {steps} steps × {cfg.examples_per_step} problems × {cfg.num_samples} samples "
              f"({len(train_problems)} train problems, {len(eval_problems)} for pass@{k}"
              + (f"; {long_train + long_val} left out, prompt ≥ context of {seq_len}" if long_train + long_val else "")
              + ")", file=sys.stderr, flush=True)

    engine = Engine(model, tok)
    sampler = Sampler(engine, cfg, rt)

    def save(step: int) -> None:
        if rt.main:
            checkpoint.save(wip, step, model, optimizers, {"model": model_config, "loop": loop})
        rt.barrier()

    def evaluate(step: int) -> list[float]:
        model.eval()
        texts = lambda p: [tok.decode(t) for batch in sampler(p, k, "eval", step) for t, _ in batch]  # noqa: E731
        return pass_at_k(eval_problems, texts, k, rt)

    bar = progress(total=steps, initial=start_step, desc="rl", unit="step", disable=not rt.main)
    step = start_step
    while True:
        last = step == steps
        if (step % cfg.eval_every == 0 or last) and not any(e["step"] == step for e in loop["eval"]):
            passes = evaluate(step)
            loop["eval"].append({"step": step, "problems": len(eval_problems), **{f"pass@{j + 1}": v for j, v in enumerate(passes)}})
            if rt.main:
                print(f"rl: step {step}/{steps} pass@1 {passes[0]:.4f} pass@{k} {passes[-1]:.4f} "
                      f"({len(eval_problems)} held-out problems)", file=sys.stderr, flush=True)
        if last:
            break

        t0 = time.perf_counter()
        sample_t0 = sampler.seconds
        lr_mult = 1.0 - step / steps
        common.schedule(optimizers, lr_mult, muon_momentum(step, cfg))
        positions = step_positions(step, cfg.examples_per_step, len(train_problems), cfg.seed)
        reward_sum, n_seqs, n_tokens, length_sum, loss_sum = 0.0, 0, 0, 0, 0.0
        record = rt.main and (step % cfg.eval_every == 0 or step == steps - 1)
        for pos in positions[rt.rank::rt.world_size]:
            problem = train_problems[pos]
            model.eval()
            batches = sampler(problem, cfg.num_samples, "train", step)
            flat = [tokens for batch in batches for tokens, _ in batch]
            texts = [tok.decode(t) for t in flat]
            rewards = [reward(t, problem.answer) for t in texts]
            adv = advantages(rewards)
            model.train()
            offset = 0
            for batch in batches:
                inputs, targets = rollout_batch(problem.prompt, batch, pad_id)
                inputs, targets = inputs.to(rt.device), targets.to(rt.device)
                a = torch.tensor(adv[offset: offset + len(batch)], dtype=torch.float32, device=rt.device)
                offset += len(batch)
                with rt.autocast():
                    nll = model(inputs, targets, loss_reduction="none")
                loss = pg_loss(nll, targets, a, num_batches, per_rank)
                loss.backward()
                loss_sum += loss.item()
            reward_sum += sum(rewards)
            n_seqs += len(flat)
            n_tokens += sum(sum(mask) for batch in batches for _, mask in batch)
            length_sum += sum(len(t) for t in flat)
            if record:
                record = False  # the step's first problem (always on rank 0)
                loop["samples"].append({
                    "step": step, "question": problem.question, "answer": problem.answer, "source": problem.source,
                    "mean_reward": sum(rewards) / len(rewards),
                    "samples": [{"text": t, "reward": r} for t, r in zip(texts[:SAMPLES_PER_RECORD], rewards)]})
        common.optimizer_step(model, optimizers, cfg.grad_clip, rt)
        reward_sum, n_seqs, n_tokens, length_sum, loss_sum = rt.sum_across_ranks([reward_sum, n_seqs, n_tokens, length_sum, loss_sum])
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step += 1
        mean_reward = reward_sum / n_seqs
        curve = loop["train"]
        curve["step"].append(step)
        curve["mean_reward"].append(mean_reward)
        curve["loss"].append(loss_sum / rt.world_size)
        curve["lr_mult"].append(lr_mult)
        curve["tokens_sampled"].append(int(n_tokens))
        curve["mean_length"].append(length_sum / n_seqs)
        loop["train_seconds"] += dt
        loop["sample_seconds"] += sampler.seconds - sample_t0
        loop["sequences"] += int(n_seqs)
        loop["tokens_sampled"] += int(n_tokens)
        postfix = {"reward": f"{mean_reward:.3f}", "lr": f"{lr_mult:.2f}", "samples_s": f"{n_seqs / dt:,.1f}"}
        if loop["eval"]:
            postfix["pass@1"] = f"{loop['eval'][-1]['pass@1']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if stop.agreed(rt) or step % cfg.checkpoint_every == 0:
            save(step)
            if stop.requested:
                bar.close()
                print(f"rl: SIGTERM: checkpoint at step {step}; rerun to resume", file=sys.stderr, flush=True)
                runtime.shutdown(rt)
                sys.exit(143)
    bar.close()

    final, first = loop["eval"][-1], loop["eval"][0]
    metrics = {
        "algorithm": ALGORITHM, "steps": steps, "problems": len(train_problems), "eval_problems": len(eval_problems),
        "left_out_long_prompts": long_train + long_val, "examples_per_step": cfg.examples_per_step,
        "num_samples": cfg.num_samples, "world_size": rt.world_size, "params": model.num_params(),
        "mean_reward": loop["train"]["mean_reward"][-1], "first_mean_reward": loop["train"]["mean_reward"][0],
        "pass_k": k, "pass@1": final["pass@1"], "pass@k": final[f"pass@{k}"],
        "first_pass@1": first["pass@1"], "first_pass@k": first[f"pass@{k}"],
        "sequences_sampled": loop["sequences"], "tokens_sampled": loop["tokens_sampled"],
        # sampled sequences per second of training (sampling + the update); and of sampling alone
        "samples_per_s": loop["sequences"] / loop["train_seconds"] if loop["train_seconds"] else None,
        "sampling_samples_per_s": loop["sequences"] / loop["sample_seconds"] if loop["sample_seconds"] else None,
        "train_seconds": loop["train_seconds"], "resumed_from": loop["resumed_from"],
        "device": rt.device_name(), "device_type": rt.device_type(),
    }
    if rt.main:
        common.commit(out_dir, model, model_config, "rl", steps, ckpt_dir / "tokenizer",
                      {"curve.json": {"algorithm": ALGORITHM, "train": loop["train"], "eval": loop["eval"]},
                       "samples.json": loop["samples"]})
    runtime.shutdown(rt)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return runtime.main("rl", "model.train.rl", train, argv)


if __name__ == "__main__":
    sys.exit(main())
