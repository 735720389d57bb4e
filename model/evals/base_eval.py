"""Evaluate a base checkpoint: the `base_eval` stage's entry point.

    python -m model.evals.base_eval spec.json                      # one process
    torchrun --nproc_per_node N -m model.base_eval spec.json # items and bpb batches split over N ranks

spec.json: {"config": BaseEvalConfig, "checkpoint_dir", "dataset_dir", "evalset_dir", "out_dir", "metrics_path"}.

Writes into out_dir: `core.json` (every task's row and the aggregate), `core_table.json` (the rows as a
table for Prefect), `evals.json` (long-format rows for DuckDB's `evals`), `report.md`, `bpb.json` (train
and val bits per byte on the first `bpb_tokens` tokens of each split) and `samples.json` (greedy
continuations of the fixed prompts).

The task list is the evalset's core.yaml when it has one, else the built-in 22 tasks; baselines are the
evalset's eval_meta_data.csv when present, else DCLM's published ones (derived from the items for a task
DCLM does not list). A task without data is
"not run: data unavailable", and the aggregate is called CORE only when all 22 tasks ran.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from model.evals import core_eval
from model.train import runtime
from model.evals.core_tasks import NOT_RUN, TASKS, eval_rows, load_baselines, load_task_list
from model.evals.bpb import evaluate_bpb
from model.config import BaseEvalConfig
from model.progress import progress
from model.nn.load import load_model
from model.data.loader import iter_eval_batches
from model.train.base import samples


def run_core(model, tok, evalset_dir: Path, max_per_task: int | None, rt: runtime.Runtime,
             batch_tokens: int | None = None) -> dict:
    """Every CORE task of the evalset artifact, items split over ranks; rows for missing tasks say so."""
    evalset_dir = Path(evalset_dir)
    yaml_path, csv_path = evalset_dir / "core.yaml", evalset_dir / "eval_meta_data.csv"
    tasks = load_task_list(yaml_path) if yaml_path.exists() else TASKS
    meta = json.loads((evalset_dir / "sets.json").read_text())
    present = [meta[t.dataset]["items"] for t in tasks if meta.get(t.dataset, {}).get("status") == "ok"]
    bar = progress(total=sum(min(n, max_per_task or n) for n in present), desc="CORE", unit="item", disable=not rt.main)
    core = core_eval.evaluate_core(model, tok, evalset_dir / "sets", rt.device, max_per_task,
                                   load_baselines(csv_path) if csv_path.exists() else None, tasks=tasks,
                                   rank=rt.rank, world_size=rt.world_size,
                                   reduce=rt.sum_across_ranks if rt.distributed else None,
                                   progress=lambda n: bar.update(n * rt.world_size), batch_tokens=batch_tokens)
    bar.close()
    for task in tasks:
        row = core["tasks"][task.label]
        if row["status"] == "ok":
            row["file"] = f"sets/{task.dataset}.jsonl"  # within the evalset artifact, whose key names the items
            row["items_sha256"] = meta[task.dataset]["sha256"]
    return core


def table(core: dict) -> list[dict]:
    out = []
    for label, r in core["tasks"].items():
        if r["status"] != "ok":
            out.append({"task": label, "type": "", "shots": None, "items": None, "accuracy": None,
                        "baseline %": None, "centered": None, "status": r["status"]})
        else:
            out.append({"task": label, "type": r["type"], "shots": r["shots"], "items": r["n"],
                        "accuracy": round(r["accuracy"], 4), "baseline %": round(r["baseline"], 2),
                        "centered": round(r["centered"], 4), "status": "ok"})
    return out


def markdown(core: dict, bpb: dict) -> str:
    agg = core["aggregate"]
    head = f"**{agg['name']}: {agg['value']:.4f}**" if agg["value"] is not None else f"**CORE: {NOT_RUN}**"
    lines = [head, "", f"train bpb {bpb['train_bpb']:.4f} · val bpb {bpb['val_bpb']:.4f} ({bpb['tokens']:,} tokens each)", "",
             "| task | type | shots | items | accuracy | baseline % | centered |", "|---|---|---|---|---|---|---|"]
    for r in table(core):
        if r["status"] != "ok":
            lines.append(f"| {r['task']} | | | | {r['status']} | | |")
        else:
            lines.append(f"| {r['task']} | {r['type']} | {r['shots']} | {r['items']} | {r['accuracy']:.4f} | "
                         f"{r['baseline %']:.1f} | {r['centered']:.4f} |")
    if agg["missing"]:
        lines += ["", f"{agg['name']} covers {len(agg['tasks'])} tasks; not run (data unavailable): {', '.join(agg['missing'])}."]
    return "\n".join(lines) + "\n"


def evaluate(spec: dict) -> dict:
    cfg = runtime.parse_config(BaseEvalConfig, spec["config"], "base_eval")
    out_dir = Path(spec["out_dir"])
    rt = runtime.init(cfg.device)
    model, tok = load_model(Path(spec["checkpoint_dir"]), rt.device)
    t0 = time.perf_counter()
    with rt.autocast():
        core = run_core(model, tok, Path(spec["evalset_dir"]), cfg.max_per_task, rt, cfg.core_batch_tokens)
    core_seconds = time.perf_counter() - t0

    token_bytes = load_file(str(Path(spec["checkpoint_dir"]) / "tokenizer" / "token_bytes.safetensors"))["token_bytes"].long()
    seq = model.config.sequence_len
    bpb = {"tokens": max(1, cfg.bpb_tokens // (cfg.batch_size * seq)) * cfg.batch_size * seq, "sequence_len": seq}
    for split in ("train", "val"):
        batches = iter_eval_batches(Path(spec["dataset_dir"]), tok, cfg.batch_size, seq, cfg.bpb_tokens // rt.world_size,
                                    rank=rt.rank, world_size=rt.world_size, device=str(rt.device), split=split)
        bpb[f"{split}_bpb"] = evaluate_bpb(model, batches, token_bytes, rt)
    sampled = samples(model, tok, cfg.sample_tokens) if rt.main else []

    agg = core["aggregate"]
    metrics = {
        "score": agg["value"], "score_name": agg["name"], "core_tasks": len(agg["tasks"]), "core_missing": agg["missing"],
        "train_bpb": bpb["train_bpb"], "val_bpb": bpb["val_bpb"], "core_seconds": round(core_seconds, 3),
        "items": sum(r.get("n", 0) for r in core["tasks"].values()),
        "device_type": rt.device_type(), "world_size": rt.world_size,
    }
    metrics["items_per_s"] = metrics["items"] / core_seconds if core_seconds > 0 else None
    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "core.json").write_text(json.dumps(core, indent=1, sort_keys=True))
        (out_dir / "core_table.json").write_text(json.dumps(table(core), indent=1))
        (out_dir / "bpb.json").write_text(json.dumps(bpb, indent=1, sort_keys=True))
        (out_dir / "samples.json").write_text(json.dumps(sampled, indent=1, ensure_ascii=False))
        (out_dir / "report.md").write_text(markdown(core, bpb))
        bpb_rows = [{"suite": "bpb", "task": split, "metric": "bpb", "value": bpb[f"{split}_bpb"], "n": bpb["tokens"],
                     "status": "ok"} for split in ("train", "val")]
        (out_dir / "evals.json").write_text(json.dumps(eval_rows(core) + bpb_rows, indent=1))
    runtime.shutdown(rt)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return runtime.main("base_eval", "model.evals.base_eval", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
