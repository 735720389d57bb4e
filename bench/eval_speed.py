"""Evaluation speed on this machine's device: items/s of CORE and of the chat tasks, and the eval stages' wall time.

    python bench/eval_speed.py                         # the tiny checkpoint and eval sets of the store (refs */tiny)
    python bench/eval_speed.py --json                  # one JSON object of figures (bench/before_after.py reads it)
    python bench/eval_speed.py --stages                # also base_eval's and chat_eval's entry points, whole
    python bench/eval_speed.py --model base/d20 --core-evalset core_evalset/d20 --chat-evalset chat_evalset/d20 --items 200
    CHATFORGE_CODE=/path/to/older/checkout python bench/eval_speed.py --json   # the same figures for older code

Rows (each after a warm-up):
- CORE suite: every CORE task the evalset holds, --core-items items each (nanochat's seeded cut), as the
  base_eval stage scores them (this code's default batching; item by item before it existed).
- CORE multiple choice (the first available of arc_easy, piqa, copa, …), --items items.
- chat categorical (mmlu, else arc_easy): letter logits at the answer position, --batch (and 1 with --batch1).
- chat generative (gsm8k): greedy generation of up to --max-new-tokens per item on the KV-cache engine,
  --gen-items items, --batch (and 1 with --batch1).
- --stages: `model.evals.base_eval.evaluate` and `model.evals.chat_eval.evaluate` on the store's artifacts
  with the tiny preset's base_eval / chat_eval config (CORE, bits per byte, samples; the six chat tasks with
  HumanEval in the sandbox, the chat-format probes), wall seconds each; outputs go to a temporary directory.
Items/s = items / wall seconds. Timings on a shared CPU are noisy: run twice, trust what repeats.
Run `chatforge run --preset tiny` first (with CHATFORGE_EVAL_DIR for CORE).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# CHATFORGE_CODE: another checkout to measure (a before/after table runs this same script on both)
sys.path.insert(0, os.environ.get("CHATFORGE_CODE") or str(Path(__file__).resolve().parents[1]))

from artifacts.store import Store  # noqa: E402
from model.evals import chat_eval, core_eval  # noqa: E402
from model.evals.core_tasks import TASKS  # noqa: E402
from model.evals.evalsets import load_sets  # noqa: E402
from model.nn.load import load_model  # noqa: E402
from model.train.runtime import init  # noqa: E402

MC_PREFERENCE = ("arc_easy", "piqa", "copa", "openbook_qa", "commonsense_qa", "boolq")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="base/tiny", help="checkpoint ref, key or prefix in the store (default base/tiny)")
    ap.add_argument("--core-evalset", default="core_evalset/tiny", help="CORE evalset ref (default core_evalset/tiny)")
    ap.add_argument("--chat-evalset", default="chat_evalset/tiny", help="chat evalset ref (default chat_evalset/tiny)")
    ap.add_argument("--dataset", default="data/tiny", help="dataset ref, for --stages' bits per byte (default data/tiny)")
    ap.add_argument("--items", type=int, default=32, help="items of the CORE mc and chat categorical rows (default 32)")
    ap.add_argument("--core-items", type=int, default=16, help="items per task of the CORE suite row (default 16; tiny: 40)")
    ap.add_argument("--gen-items", type=int, default=16, help="items of the chat generative rows (default 16)")
    ap.add_argument("--batch", type=int, default=16, help="chat batch size compared with batch 1 (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per generative item (default 64)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--store", default=None, help="store URL (default: CHATFORGE_HOME's)")
    ap.add_argument("--batch1", action="store_true", help="also the chat rows at batch 1 (slow)")
    ap.add_argument("--stages", action="store_true", help="also time the base_eval and chat_eval entry points")
    ap.add_argument("--json", action="store_true", help="print one JSON object of figures instead of the table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    store = Store(args.store)
    rt = init("auto")
    try:
        model, tok = load_model(store.local_path(store.resolve(args.model)), rt.device)
    except Exception as e:  # noqa: BLE001 - the bench only reports what it cannot find
        print(f"eval_speed: error: cannot load {args.model!r} ({e}): run `chatforge run --preset tiny` first", file=sys.stderr)
        return 1
    figures: dict[str, float | None] = {}
    say = (lambda *a, **k: None) if args.json else print
    say(f"device {rt.device_name()}, model {args.model}: depth {model.config.n_layer}, width {model.config.n_embd}, "
        f"context {model.config.sequence_len}; CORE batching: {'yes' if hasattr(core_eval, 'score_items') else 'no'}")
    say(f"{'row':<56} {'items':>6} {'seconds':>8} {'items/s':>9}")

    def row(key: str, name: str, n: int, seconds: float) -> None:
        figures[key] = n / seconds
        say(f"{name:<56} {n:>6} {seconds:>8.2f} {n / seconds:>9.2f}", flush=True)

    core_dir = _dir(store, args.core_evalset)
    core = load_sets(core_dir) if core_dir else {}
    present = [t for t in TASKS if core.get(t.dataset)]
    if not present:
        say(f"{'CORE':<56} not run: no CORE sets in {args.core_evalset}")
    else:
        sets = core_dir / "sets"
        with rt.autocast():
            core_eval.evaluate_task(model, tok, core[present[0].dataset], present[0], rt.device, max_items=2)
            res: dict = {}
            s = timed(lambda: res.update(core_eval.evaluate_core(model, tok, sets, rt.device, args.core_items, tasks=present)))
        row("core_items_per_s", f"CORE suite ({len(present)} tasks, {args.core_items} items each)",
            sum(r.get("n", 0) for r in res["tasks"].values()), s)
        figures["core_score"] = res["aggregate"]["value"]
        task = next((t for t in present if t.dataset in MC_PREFERENCE), None)
        if task is not None:
            items = core[task.dataset]
            with rt.autocast():
                s = timed(lambda: core_eval.evaluate_task(model, tok, items, task, rt.device, max_items=args.items))
            row("core_mc_items_per_s", f"CORE {task.label} ({task.shots}-shot, mc)", min(args.items, len(items)), s)

    chat_dir = _dir(store, args.chat_evalset)
    chat = load_sets(chat_dir) if chat_dir else {}
    categorical = "mmlu" if chat.get("mmlu") else "arc_easy"
    for name, kind, key, n_items in ((categorical, "categorical", "categorical", args.items),
                                     ("gsm8k", "generative", "generative", args.gen_items)):
        items = chat.get(name)
        if not items:
            say(f"{'chat ' + name:<56} not run: not in {args.chat_evalset}")
            continue
        n = min(n_items, len(items))
        for batch in ((1, args.batch) if args.batch1 else (args.batch,)):
            answerer = chat_eval.ModelAnswerer(model, tok, batch)
            with rt.autocast():
                chat_eval.evaluate_task(answerer, tok, name, items, max_items=1, max_tokens=args.max_new_tokens)
                s = timed(lambda: chat_eval.evaluate_task(answerer, tok, name, items, max_items=n, max_tokens=args.max_new_tokens))
            suffix = f", {args.max_new_tokens} new tokens" if kind == "generative" else ""
            row(f"{key}_items_per_s" if batch == args.batch else f"{key}_b1_items_per_s",
                f"chat {name} ({kind}{suffix}), batch {batch}", n, s)

    if args.stages:
        _stages(store, args, figures, say)
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    return 0


def _stages(store: Store, args, figures: dict, say) -> None:
    """Wall seconds of each eval stage's entry point, run in this process on the store's artifacts."""
    from flows.presets import tiny
    from model.evals import base_eval

    cfg = tiny()
    dirs = {k: _dir(store, ref) for k, ref in (("checkpoint_dir", args.model), ("dataset_dir", args.dataset),
                                                 ("core", args.core_evalset), ("chat", args.chat_evalset))}
    with tempfile.TemporaryDirectory() as tmp:
        runs = (("base_eval_s", base_eval, cfg.base_eval, "core", {"dataset_dir": str(dirs["dataset_dir"])}),
                ("chat_eval_s", chat_eval, cfg.chat_eval, "chat", {"checkpoint": "base"}))
        for key, module, section, evalset, extra in runs:
            if dirs[evalset] is None or dirs["checkpoint_dir"] is None:
                say(f"{module.__name__:<56} not run: missing inputs in the store")
                continue
            out = Path(tmp) / key
            spec = {"config": section.model_dump(mode="json"), "checkpoint_dir": str(dirs["checkpoint_dir"]),
                    "evalset_dir": str(dirs[evalset]), "out_dir": str(out), "metrics_path": str(out / "metrics.json"),
                    **extra}
            figures[key] = timed(lambda: module.evaluate(spec))
            say(f"{'stage ' + module.__name__.rsplit('.', 1)[1] + ' (entry point, tiny config)':<56} "
                f"{'':>6} {figures[key]:>8.2f}", flush=True)


def _dir(store: Store, ref: str) -> Path | None:
    try:
        return Path(store.local_path(store.resolve(ref)))
    except Exception:  # noqa: BLE001 - a missing artifact is reported per row
        return None


if __name__ == "__main__":
    sys.exit(main())
