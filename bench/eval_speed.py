"""Evaluation speed on this machine's device: items/s of a multiple-choice task and a generative one.

    python bench/eval_speed.py                         # the tiny checkpoint and eval sets of the store (refs */tiny)
    python bench/eval_speed.py --model base/d20 --core-evalset core_evalset/d20 --chat-evalset chat_evalset/d20 --items 200

Rows (each after one warm-up item):
- CORE multiple choice (the first available of arc_easy, piqa, copa, …): one padded forward per item, all
  choices in it; the item's few-shot prompt as CORE builds it.
- chat categorical (mmlu, else arc_easy): letter logits at the answer position, batch 1 vs --batch.
- chat generative (gsm8k): greedy generation of up to --max-new-tokens per item on the KV-cache engine,
  batch 1 vs --batch.
Items/s = items / wall seconds. Run `chatforge run --preset tiny` first (with CHATFORGE_EVAL_DIR for CORE).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    ap.add_argument("--items", type=int, default=64, help="items per row (default 64)")
    ap.add_argument("--batch", type=int, default=16, help="batch size compared with batch 1 (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per generative item (default 64)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--store", default=None, help="store URL (default: CHATFORGE_HOME's)")
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
    print(f"device {rt.device_name()}, model {args.model}: depth {model.config.n_layer}, width {model.config.n_embd}, "
          f"context {model.config.sequence_len}, {args.items} items per row")
    print(f"{'row':<52} {'items':>6} {'seconds':>8} {'items/s':>9}")

    def row(name: str, n: int, seconds: float) -> None:
        print(f"{name:<52} {n:>6} {seconds:>8.2f} {n / seconds:>9.1f}", flush=True)

    core = _sets(store, args.core_evalset)
    task = next((t for t in TASKS if t.dataset in MC_PREFERENCE and core.get(t.dataset)), None)
    if task is None:
        print(f"{'CORE multiple choice':<52} not run: no CORE multiple-choice set in {args.core_evalset}")
    else:
        items = core[task.dataset]
        with rt.autocast():
            core_eval.evaluate_task(model, tok, items, task, rt.device, max_items=1)
            s = timed(lambda: core_eval.evaluate_task(model, tok, items, task, rt.device, max_items=args.items))
        row(f"CORE {task.label} ({task.shots}-shot, mc)", min(args.items, len(items)), s)

    chat = _sets(store, args.chat_evalset)
    for name, kind in (("mmlu", "categorical"), ("arc_easy", "categorical"), ("gsm8k", "generative")):
        items = chat.get(name)
        if not items:
            print(f"{'chat ' + name:<52} not run: not in {args.chat_evalset}")
            continue
        if kind == "categorical" and name == "arc_easy" and chat.get("mmlu"):
            continue
        n = min(args.items, len(items))
        for batch in (1, args.batch):
            answerer = chat_eval.ModelAnswerer(model, tok, batch)
            with rt.autocast():
                chat_eval.evaluate_task(answerer, tok, name, items, max_items=1, max_tokens=args.max_new_tokens)
                s = timed(lambda: chat_eval.evaluate_task(answerer, tok, name, items, max_items=n, max_tokens=args.max_new_tokens))
            label = f"chat {name} ({kind}{', ' + str(args.max_new_tokens) + ' new tokens' if kind == 'generative' else ''}), batch {batch}"
            row(label, n, s)
    return 0


def _sets(store: Store, ref: str) -> dict:
    try:
        return load_sets(store.local_path(store.resolve(ref)))
    except Exception:  # noqa: BLE001 - a missing evalset is reported per row
        return {}


if __name__ == "__main__":
    sys.exit(main())
