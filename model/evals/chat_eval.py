"""Chat evaluation: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, and ChatCORE.

Every item becomes one user turn (`model.evals.chat_tasks` says how), rendered with
`render_for_completion`: ``<|bos|> <|user_start|> text <|user_end|> <|assistant_start|>``.

Categorical tasks (``arc_easy``, ``arc_challenge``, ``mmlu``). The reply is the gold choice's letter. One
forward pass over the prompt; the prediction is the argmax, at the last prompt position, over the logits
of the item's letter tokens only (``A``, ``B``, … one per choice; each letter must encode to a single
token, else InputError; the first of equal logits wins). Baseline: the mean of 1 / number of choices over
the evaluated items. `ModelAnswerer` runs several items per right-padded pass, each padded to its own
width (its length rounded up to CORE's `WIDTH_STEP`), so its logits are bitwise those it gets alone.

Generative tasks (``gsm8k``, ``humaneval``, ``spellingbee``). Greedy decoding (temperature 0) with
`model.chat.engine.Engine`, which runs the calculator tool, for at most `max_tokens` tokens, `batch_size`
prompts per `generate_batch` (with ordinary batched products: the engine's batch-invariant mode, which the
server needs, costs evaluation a third of its speed; greedy replies equal at batch 1 and N in the tests); the reply is the
decoded text before ``<|assistant_end|>``. GSM8K is correct when the number after the last ``####``
equals the reference within 1e-6; SpellingBee when the reply's count equals the true count; HumanEval
when the program built from the reply passes the task's tests in `model.evals.sandbox.run_program` (each
program its own process, `timeout` seconds, `memory_mb`). Baseline 0. Rows count outcomes in
``statuses``: sandbox statuses for HumanEval, ``correct``/``wrong``/``no_answer`` otherwise.

Context. `ModelAnswerer` crops a prompt that does not fit by keeping ``<|bos|>`` and the newest tokens
(the question's end and ``<|assistant_start|>``): to ``sequence_len`` tokens for a categorical prompt, and
to ``sequence_len - min(max_tokens, sequence_len // 2)`` for a generative one, so that at least that
many tokens remain to answer in (the engine also stops when the context is full).

Selection. `max_per_task` = N evaluates the first N item indices after shuffling them with
``random.Random(1337)``; None evaluates all items in file order. With `world_size` W, rank r evaluates
selected items r, r + W, r + 2W, …; per task, the counts (correct, n, items per number of choices,
statuses) are summed across ranks with the caller's ``all_reduce(list[float]) -> list[float]`` (one call
per task that has data, in task order, on every rank; None = single process), so every rank returns the
full result.

Answerers. The task logic asks an `Answerer` for letter choices and reply texts, given prompt token ids
only: `ModelAnswerer` uses a GPT; `OracleAnswerer` (looks each prompt up among the items' gold answers)
and `UniformAnswerer` (random letters, text without digits or code) are test doubles whose centered
accuracy is 1 and about 0. Items carry their gold only for scoring and for the oracle.

Result. Per task ``{"task", "status": "ok", "type": "categorical" | "generative", "n", "correct",
"accuracy", "baseline" (a fraction), "centered": (accuracy - baseline) / (1 - baseline)}``; a task whose
items are missing, None or empty: ``{"task", "status": "not run: data unavailable"}``. The aggregate is
the mean centered accuracy of the tasks that ran, named ``"ChatCORE"`` only when all six ran, else
``"ChatCORE-<k> (partial)"``.
"""
from __future__ import annotations

import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch

from model.train import runtime
from model.evals.chat_tasks import (CATEGORICAL, GENERATIVE, LETTERS, TASK_NAMES, gold_response, gsm8k_answer,
                         humaneval_program, mc_letters, numbers_equal, spelling_answer, user_message)
from model.config import ChatEvalConfig
from model.chat.conversation import render_for_completion
from model.chat.engine import Engine
from model.evals.core_eval import WIDTH_STEP, own_width
from model.evals.core_tasks import NOT_RUN, eval_rows, select, suite_result
from model.errors import InputError
from model.progress import progress
from model.evals.evalsets import load_sets
from model.nn.load import load_model
from model.evals.chat_format import calculator_call_rate, turn_end_rate
from model.evals.sandbox import isolation

SANDBOX_STATUSES = ("passed", "failed", "timeout", "memory", "refused", "error")
ANSWER_STATUSES = ("correct", "wrong", "no_answer")
CHOICE_COUNTS = range(2, len(LETTERS) + 1)

AllReduce = Callable[[list[float]], list[float]]


class Answerer(Protocol):
    def choose(self, prompts: list[list[int]], letter_ids: list[list[int]]) -> list[int]:
        """Per prompt, the index (into its `letter_ids`) of the letter it answers."""

    def complete(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        """Per prompt, the assistant's reply text."""


def prompt_ids(task: str, item: dict, tok) -> list[int]:
    return render_for_completion([{"role": "user", "content": user_message(task, item)}], tok)


def letter_token_ids(tok, n: int) -> list[int]:
    ids = []
    for letter in mc_letters(n):
        encoded = tok.encode(letter)
        if len(encoded) != 1:
            raise InputError(f"the tokenizer encodes the letter {letter!r} as {len(encoded)} tokens {encoded}: "
                             "lettered multiple choice needs one token per letter (use a byte-level BPE)")
        ids.append(encoded[0])
    return ids


def crop(prompt: Sequence[int], max_len: int) -> list[int]:
    """Keep BOS and the newest max_len - 1 tokens."""
    prompt = list(prompt)
    return prompt if len(prompt) <= max_len else prompt[:1] + prompt[len(prompt) - (max_len - 1):]


# ---------------------------------------------------------------- answerers

class ModelAnswerer:
    """Answers with a GPT: letters from one right-padded forward pass per batch, replies from the Engine."""

    def __init__(self, model, tok, batch_size: int = 8, progress: Callable[[int], None] | None = None):
        self.model, self.tok, self.batch_size = model.eval(), tok, max(1, batch_size)
        self.progress = progress or (lambda n: None)  # told how many prompts each finished batch held
        self.engine = Engine(model, tok, batch_invariant=False)
        self.sequence_len = int(model.config.sequence_len)
        self.stop_ids = {tok.special_id("<|assistant_end|>"), tok.bos_id}

    def _batches(self, prompts: Sequence[Sequence[int]], width=lambda prompt: 0) -> Iterable[list[int]]:
        # similar lengths together waste less padding; only equal `width`s share a batch (by default any
        # prompts may); results go back to their own index
        order = sorted(range(len(prompts)), key=lambda i: (width(prompts[i]), len(prompts[i]), i))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or width(prompts[batch[0]]) != width(prompts[i])):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _width(self, prompt: Sequence[int]) -> int:
        # the prompt's own width, not its batch's (core_eval.own_width): its logits stay bitwise the same
        return own_width(min(len(prompt), self.sequence_len), self.sequence_len)

    @torch.inference_mode()
    def letter_logits(self, prompts: list[list[int]], letter_ids: list[list[int]]) -> list[list[float]]:
        """Per prompt, the logits of its letters at its last position."""
        device = next(self.model.parameters()).device
        out: list[list[float]] = [[] for _ in prompts]
        for rows in self._batches(prompts, self._width):
            seqs = [crop(prompts[i], self.sequence_len) for i in rows]
            ids = torch.zeros(len(seqs), self._width(seqs[0]), dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            # A causal pass over right-padded rows never lets padding reach a real token. The plain forward
            # keeps every product at least `WIDTH_STEP` rows tall, so a batch of one takes the same kernels.
            logits = self.model(ids.to(device))
            for b, i in enumerate(rows):
                out[i] = logits[b, len(seqs[b]) - 1, letter_ids[i]].tolist()
            self.progress(len(rows))
        return out

    def choose(self, prompts: list[list[int]], letter_ids: list[list[int]]) -> list[int]:
        return [max(range(len(x)), key=x.__getitem__) for x in self.letter_logits(prompts, letter_ids)]

    def complete(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        budget = self.sequence_len - min(max_tokens, self.sequence_len // 2)
        out = [""] * len(prompts)
        for rows in self._batches(prompts):
            results = self.engine.generate_batch([crop(prompts[i], budget) for i in rows], max_tokens, temperature=0.0)
            for i, (tokens, _) in zip(rows, results):
                if tokens and tokens[-1] in self.stop_ids:
                    tokens = tokens[:-1]
                out[i] = self.tok.decode(tokens)
            self.progress(len(rows))
        return out


class OracleAnswerer:
    """Test double: answers every prompt of the given items with its gold (centered accuracy 1)."""

    def __init__(self, tok, items: Mapping[str, Sequence[dict] | None]):
        self._gold: dict[tuple[int, ...], str | int] = {}
        for task, task_items in items.items():
            for item in task_items or []:
                self._gold[tuple(prompt_ids(task, item, tok))] = gold_response(task, item)

    def _lookup(self, prompt: list[int]):
        try:
            return self._gold[tuple(prompt)]
        except KeyError:
            raise KeyError("OracleAnswerer was asked a prompt of an item it was not built from") from None

    def choose(self, prompts: list[list[int]], letter_ids: list[list[int]]) -> list[int]:
        return [int(self._lookup(p)) for p in prompts]

    def complete(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        return [str(self._lookup(p)) for p in prompts]


class UniformAnswerer:
    """Test double: a uniformly random letter; replies of random lowercase words (no digits, no code)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def choose(self, prompts: list[list[int]], letter_ids: list[list[int]]) -> list[int]:
        return [self.rng.randrange(len(letters)) for letters in letter_ids]

    def complete(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        def word() -> str:
            return "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(self.rng.randint(1, 8)))
        return [" ".join(word() for _ in range(self.rng.randint(1, 12))) for _ in prompts]


# ---------------------------------------------------------------- evaluation

def _score_generative(task: str, items: list[dict], replies: list[str], timeout: float, memory_mb: int,
                      workers: int) -> list[str]:
    """One status per item; "passed" (HumanEval) or "correct" counts as right."""
    if task == "humaneval":
        from model.evals.sandbox import run_program  # only HumanEval needs the sandbox

        programs = [humaneval_program(item, reply) for item, reply in zip(items, replies)]
        with ThreadPoolExecutor(max(1, workers)) as pool:  # each program waits on its own process
            outcomes = list(pool.map(lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb), programs))
        return ["passed" if o.passed else (o.status if o.status in SANDBOX_STATUSES else "error") for o in outcomes]
    statuses = []
    for item, reply in zip(items, replies):
        if task == "gsm8k":
            found = gsm8k_answer(reply)
            right = numbers_equal(found, item["answer"])
        else:
            found = spelling_answer(reply)
            right = found is not None and found == int(item["answer"])
        statuses.append("correct" if right else "no_answer" if found is None else "wrong")
    return statuses


def evaluate_task(answerer: Answerer, tok, task: str, items: Sequence[dict] | None, *,
                  max_items: int | None = None, max_tokens: int = 256, rank: int = 0, world_size: int = 1,
                  all_reduce: AllReduce | None = None, timeout: float = 5.0, memory_mb: int = 1024,
                  workers: int = 4) -> dict:
    """One task's row (see the module doc); collective over ranks when `all_reduce` is given."""
    if task not in TASK_NAMES:
        raise KeyError(f"unknown chat task {task!r}: use one of {TASK_NAMES}")
    if not items:
        return {"task": task, "status": NOT_RUN}
    if max_items is not None and max_items < 1:
        raise InputError(f"max_per_task must be ≥ 1 or None (got {max_items})")
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is outside 0..{world_size - 1}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be ≥ 1 (got {max_tokens})")
    mine = [items[i] for i in select(len(items), max_items, rank, world_size)]
    prompts = [prompt_ids(task, item, tok) for item in mine]
    keys = SANDBOX_STATUSES if task == "humaneval" else ANSWER_STATUSES
    counts = dict.fromkeys(keys, 0)
    if task in CATEGORICAL:
        letters = [letter_token_ids(tok, len(item["choices"])) for item in mine]
        chosen = answerer.choose(prompts, letters) if mine else []
        correct = sum(int(c == int(item["answer"])) for c, item in zip(chosen, mine))
        # items per number of choices, not a float sum of 1/k: integer counts sum exactly in any rank order
        extra = [float(sum(len(item["choices"]) == k for item in mine)) for k in CHOICE_COUNTS]
    else:
        replies = answerer.complete(prompts, max_tokens) if mine else []
        for status in _score_generative(task, mine, replies, timeout, memory_mb, workers):
            counts[status] += 1
        correct = counts["passed" if task == "humaneval" else "correct"]
        extra = [float(v) for v in counts.values()]
    vector = [float(correct), float(len(mine)), *extra]
    if all_reduce is not None:
        vector = list(all_reduce(vector))
    correct, n = round(vector[0]), round(vector[1])
    accuracy = correct / n
    if task in CATEGORICAL:
        baseline = sum(round(c) / k for c, k in zip(vector[2:], CHOICE_COUNTS)) / n
    else:
        baseline = 0.0
    row = {"task": task, "status": "ok", "type": "categorical" if task in CATEGORICAL else "generative",
           "n": n, "correct": correct, "accuracy": accuracy, "baseline": baseline,
           "centered": (accuracy - baseline) / (1.0 - baseline)}
    if task in GENERATIVE:
        row["statuses"] = {k: round(v) for k, v in zip(keys, vector[2:]) if round(v)}
    return row


def aggregate_name(covered: Iterable[str]) -> str:
    covered = set(covered)
    return "ChatCORE" if covered >= set(TASK_NAMES) else f"ChatCORE-{len(covered)} (partial)"


def evaluate_chat(model, tok, items: Mapping[str, Sequence[dict] | None], *, answerer: Answerer | None = None,
                  batch_size: int = 8, max_per_task: int | None = None, max_tokens: int = 256, rank: int = 0,
                  world_size: int = 1, all_reduce: AllReduce | None = None, timeout: float = 5.0,
                  memory_mb: int = 1024, workers: int = 4) -> dict:
    """Run the six tasks on `items` ({task: list of items or None}); missing tasks are "not run".

    Returns ``{"tasks": {task: row}, "aggregate": {"name", "value", "tasks", "missing"}, <name>: value}``.
    `answerer` defaults to ``ModelAnswerer(model, tok, batch_size)`` (`model` may then be None).
    """
    unknown = set(items) - set(TASK_NAMES)
    if unknown:
        raise KeyError(f"unknown chat tasks {sorted(unknown)}: use some of {TASK_NAMES}")
    answerer = answerer if answerer is not None else ModelAnswerer(model, tok, batch_size)
    rows = {task: evaluate_task(answerer, tok, task, items.get(task), max_items=max_per_task,
                                max_tokens=max_tokens, rank=rank, world_size=world_size, all_reduce=all_reduce,
                                timeout=timeout, memory_mb=memory_mb, workers=workers)
            for task in TASK_NAMES}
    return suite_result(rows, aggregate_name)


# ---------------------------------------------------------------- the `chat_eval` stage's entry point
#   python -m model.evals.chat_eval spec.json                       (one process)
#   torchrun --nproc_per_node N -m model.chat_eval spec.json  (items split over N ranks)
# spec.json: {"config": ChatEvalConfig, "checkpoint_dir", "evalset_dir", "out_dir", "metrics_path"}

def table(result: dict) -> list[dict]:
    rows = []
    for task, r in result["tasks"].items():
        ok = r["status"] == "ok"
        rows.append({"task": task, "type": r.get("type", ""), "items": r.get("n"),
                     "accuracy": round(r["accuracy"], 4) if ok else None,
                     "baseline": round(r["baseline"], 4) if ok else None,
                     "centered": round(r["centered"], 4) if ok else None,
                     "outcomes": ", ".join(f"{k} {v}" for k, v in r.get("statuses", {}).items()), "status": r["status"]})
    return rows


def markdown(result: dict, checkpoint: str) -> str:
    agg = result["aggregate"]
    head = f"**{agg['name']}: {agg['value']:.4f}**" if agg["value"] is not None else f"**ChatCORE: {NOT_RUN}**"
    lines = [head + f" (checkpoint: {checkpoint})", "", "| task | type | items | accuracy | baseline | centered | outcomes |",
             "|---|---|---|---|---|---|---|"]
    for r in table(result):
        if r["status"] != "ok":
            lines.append(f"| {r['task']} | | | {r['status']} | | | |")
        else:
            lines.append(f"| {r['task']} | {r['type']} | {r['items']} | {r['accuracy']:.4f} | {r['baseline']:.3f} | "
                         f"{r['centered']:.4f} | {r['outcomes']} |")
    if "format" in result:
        f = result["format"]
        lines += ["", f"Chat format (model/evals/chat_format.py): {f['ends_turn']:.1%} of replies to 32 fixed prompts end "
                  f"their turn; {f['calculator_calls']:.1%} of 32 sampled replies to word problems hold a well-formed "
                  "calculator call."]
    if agg["missing"]:
        lines += ["", f"{agg['name']} covers {', '.join(agg['tasks']) or 'no task'}; not run (data unavailable): "
                  f"{', '.join(agg['missing'])}."]
    return "\n".join(lines) + "\n"


def evaluate(spec: dict) -> dict:
    cfg = runtime.parse_config(ChatEvalConfig, spec["config"], "chat_eval")
    rt = runtime.init(cfg.device)
    model, tok = load_model(Path(spec["checkpoint_dir"]), rt.device)
    sets = load_sets(Path(spec["evalset_dir"]))
    if sets.get("humaneval"):  # fail now, naming the fix, not after the other tasks' minutes of generation
        from model.evals.sandbox import require

        require()

    rows, seconds = {}, {}
    for task in TASK_NAMES:
        items = sets.get(task)
        n = len(select(len(items), cfg.max_per_task, rt.rank, rt.world_size)) if items else 0
        bar = progress(total=n, desc=f"chat_eval {task}", unit="item", disable=not rt.main or not n)
        answerer = ModelAnswerer(model, tok, cfg.batch_size, progress=bar.update)
        t0 = time.perf_counter()
        with rt.autocast():
            rows[task] = evaluate_task(answerer, tok, task, items, max_items=cfg.max_per_task, max_tokens=cfg.max_new_tokens,
                                       rank=rt.rank, world_size=rt.world_size,
                                       all_reduce=rt.sum_across_ranks if rt.distributed else None,
                                       timeout=cfg.humaneval_timeout, memory_mb=cfg.humaneval_memory_mb)
        bar.close()
        seconds[task] = round(time.perf_counter() - t0, 3)
        if rows[task]["status"] == "ok":
            rows[task]["seconds"] = seconds[task]
            if rt.main:
                r = rows[task]
                print(f"chat_eval: {task}: {r['correct']}/{r['n']} = {r['accuracy']:.4f} (centered {r['centered']:.4f}) "
                      f"in {seconds[task]:.1f} s", file=sys.stderr, flush=True)
    checkpoint = spec.get("checkpoint", "base")  # the stage whose checkpoint this is (base, mid, sft, rl)
    result = {**suite_result(rows, aggregate_name), "checkpoint": checkpoint}
    if rt.main:  # the chat-format probes (model/evals/chat_format.py): fixed prompts, deterministic, cheap
        engine = Engine(model, tok)
        with rt.autocast():
            result["format"] = {"ends_turn": turn_end_rate(engine, tok, cfg.max_new_tokens),
                                "calculator_calls": calculator_call_rate(engine, tok, cfg.max_new_tokens)}
        print(f"chat_eval: replies ending their turn {result['format']['ends_turn']:.3f}, with a well-formed "
              f"calculator call {result['format']['calculator_calls']:.3f}", file=sys.stderr, flush=True)
    agg = result["aggregate"]
    name, value, covered = agg["name"], agg["value"], agg["tasks"]
    metrics = {"score": value, "score_name": name, "chat_tasks": len(covered), "chat_missing": agg["missing"],
               "checkpoint": checkpoint, **result.get("format", {}), "device_type": rt.device_type(), "world_size": rt.world_size,
               **{f"{t}_accuracy": rows[t]["accuracy"] for t in covered},
               "items_per_s": {t: rows[t]["n"] / seconds[t] for t in covered if seconds[t] > 0},
               "sandbox": isolation()}
    if rt.main:
        out = Path(spec["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "chat_eval.json").write_text(json.dumps(result, indent=1, sort_keys=True))
        (out / "chat_table.json").write_text(json.dumps(table(result), indent=1))
        (out / "report.md").write_text(markdown(result, checkpoint))
        (out / "evals.json").write_text(json.dumps(eval_rows(result), indent=1))
    runtime.shutdown(rt)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return runtime.main("chat_eval", "model.evals.chat_eval", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
