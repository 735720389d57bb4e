"""`report` stage: the run's report card (artifacts/report.py) as report.md and report.json, shown in Prefect.

Last in the DAG, after every eval (and the decontamination report), so a full run's card has every section. Its
key holds the run id (`report.run_id`, set by the pipeline before keys are planned): each run writes its own
card, and a retried run finds the one it wrote. Cheap: it reads the catalog, trains and scores nothing.

`environment()` is what the card's Environment section shows: measured once when a flow starts and kept in
the run's record (runs/<id>.json), without importing torch (package versions from the installed metadata).
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata

from model.config import ReportConfig
from model.errors import InputError

from .stage import StageContext, StageDef

MISSING_RUN = ("stage report needs the run its card describes: `chatforge stage report --run RUN_ID` (or --set "
               "report.run_id=RUN_ID); `chatforge report RUN_ID` prints a card without storing one")
# besides chatforge's own dependencies, the launchers a stage may use when they are installed
OPTIONAL_PACKAGES = ("deepspeed", "transformers")


def environment() -> dict:
    """The flow host's Python, OS, CPUs, memory, GPUs (nvidia-smi, when there is one), chatforge's code
    version and the installed versions of its dependencies."""
    from .runner import code_version

    names = [re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0] for req in metadata.requires("chatforge") or []
             if "extra ==" not in req] if _version("chatforge") else []
    packages = {}
    for name in [*names, *OPTIONAL_PACKAGES]:
        if name and name not in packages and (version := _version(name)):
            packages[name] = version
    env = {"code": code_version(), "python": platform.python_version(), "platform": platform.platform(),
           "cpus": os.cpu_count(), "packages": packages, "gpus": _gpus()}
    try:
        env["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not every OS answers sysconf
        pass
    return env


def _version(name: str) -> str | None:
    """The installed version, or None (one metadata lookup: each one scans sys.path)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    """`NVIDIA H100 80GB HBM3 (81559 MiB)` per GPU; none without nvidia-smi (a CPU host, or GPUs elsewhere: then
    the ledger's device types are the run's hardware)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [f"{name.strip()} ({mem.strip()})" for name, _, mem in (line.partition(",") for line in out.splitlines()) if name.strip()]


def compute(cfg: ReportConfig, ctx: StageContext) -> dict:
    from artifacts import report
    from artifacts.catalog import open_catalog
    from artifacts.store import Store
    from artifacts.summary import dollars, seconds

    from .registry import STAGES  # the DAG, to name the stages a run did not reach (imported here: it imports us)

    if not cfg.run_id:
        raise InputError(MISSING_RUN)
    catalog = open_catalog(Store(ctx.store_url))  # the cached catalog: reads only the files new since its last refresh
    try:
        card = report.card(catalog.con, cfg.run_id, max_metrics=cfg.max_stage_metrics,
                           dag=[s.name for s in STAGES if s.name != STAGE.name])  # this stage's own row comes after the card
    finally:
        catalog.close()
    (ctx.out_dir / "report.md").write_text(report.markdown(card))
    (ctx.out_dir / "report.json").write_text(json.dumps(card, indent=1))
    t, sc = card["totals"], card["scores"]
    ctx.log(f"report: run {cfg.run_id}: {len(card['stages'])} stages, {dollars(t['cost_usd'])}, "
            f"{seconds(t['wall_clock_seconds'])} wall clock")
    # the card's triple, under names of its own: `score`/`score_name` would make the summary list it as a score
    return {"run_id": cfg.run_id, "stages": len(card["stages"]), "not_run": card["not_run"],
            "cost_usd": t["cost_usd"], "saved_usd": t["saved_usd"], "wall_clock_seconds": t["wall_clock_seconds"],
            "stage_seconds": t["stage_seconds"], "core_name": sc.get("core_name"), "core": sc.get("core"),
            "chat_name": sc.get("chat_name"), "chat_score": sc.get("chat_score")}


STAGE = StageDef(
    name="report", kind="report", section="report",
    inputs=("decontam", "base_eval", "chat_eval_base", "chat_eval_mid", "chat_eval_sft", "chat_eval_rl"),
    code=("artifacts.report", "artifacts.summary", "artifacts.catalog", "artifacts.catalog_files", "tasks.report"),
    compute=compute, reports=("report.md",),
    describe="The run's report card (nanochat's): environment, a section per stage (time, $, cache hit, key metrics), "
             "metrics by model (BASE/MID/SFT/RL), total wall clock, cost and dollars saved by cache hits.",
)
