"""The Prefect flows: the whole pipeline, and a single stage with inputs resolved from the store."""
from __future__ import annotations

import socket
from datetime import datetime, timezone

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from artifacts import ledger
from artifacts.errors import ArtifactMissing
from artifacts.store import Store
from model.config import PipelineConfig
from model.errors import InputError
from tasks.prefect_task import make_task
from tasks.registry import STAGES, get
from tasks.report import MISSING_RUN, environment
from tasks.stage import plan, upstream

TASKS = {st.name: make_task(st) for st in STAGES}


def _run_id() -> str:
    return str(runtime.flow_run.id)


def _start(config: PipelineConfig, store: str | None, card_of_this_run: bool) -> tuple[Store, PipelineConfig, dict[str, str], str]:
    """Record the run (config, origin, environment) and plan its keys. The report stage's key holds the run its
    card describes: this run (`card_of_this_run`, the pipeline), else the one the config names (a single-stage
    rerun of an earlier run's card). The config is copied, never changed in place: it is the flow's parameter."""
    st = Store(store)
    st.ensure_writable()
    run_id = _run_id()
    config = config.model_copy(deep=True)
    if card_of_this_run:
        config.report.run_id = run_id
    ledger.record_run(st, run_id, {
        "preset": config.preset, "started": datetime.now(timezone.utc).isoformat(),
        "host": socket.gethostname(), "config": config.model_dump(mode="json"),
        "flow_run_name": runtime.flow_run.name, "env": environment(),
    })
    return st, config, plan(STAGES, config), run_id


@flow(name="chatforge", persist_result=False, validate_parameters=True)
def pipeline(
    config: PipelineConfig,
    until: str | None = None,
    force: list[str] | None = None,
    store: str | None = None,
) -> dict[str, str]:
    """Run the DAG (up to `until`); finished stages come from the store. Returns stage → key."""
    st, config, keys, run_id = _start(config, store, card_of_this_run=True)
    stages = upstream(STAGES, get(until).name) if until else STAGES
    rows = []
    for s in stages:
        state = TASKS[s.name](config, keys, run_id, st.url, force=s.name in (force or []), return_state=True)
        result = state.result()  # re-raises a failed stage's error, which fails the flow
        rows.append(f"| `{s.name}` | `{keys[s.name][:12]}` | {state.name} | {result.get('wall_seconds') or 0:.1f} s |")
    create_markdown_artifact(
        key="chatforge-run",
        markdown="| stage | key | state | compute wall |\n|---|---|---|---|\n" + "\n".join(rows),
        description=f"{config.preset}: stage keys",
    )
    return {s.name: keys[s.name] for s in stages}


@flow(name="chatforge-stage", persist_result=False, validate_parameters=True)
def stage_flow(stage: str, config: PipelineConfig, force: bool = False, store: str | None = None) -> str:
    """Run one stage; its inputs must already be in the store (rerun of a failed stage)."""
    s = get(stage)
    if s.section == "report" and not config.report.run_id:  # refused before anything is recorded
        raise InputError(MISSING_RUN)
    st, config, keys, run_id = _start(config, store, card_of_this_run=False)
    for name in s.inputs:
        if st.manifest(keys[name]) is None:
            raise ArtifactMissing(
                f"input {name!r} of stage {stage!r} (key {keys[name][:12]}) is not in {st.url}: "
                f"run `chatforge run --until {name}` with the same config first"
            )
    TASKS[stage](config, keys, run_id, st.url, force=force)
    return keys[stage]
