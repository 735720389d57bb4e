"""The Prefect flows: the whole pipeline, and a single stage with inputs resolved from the store."""
from __future__ import annotations

import socket
from collections.abc import Sequence
from datetime import datetime, timezone

from prefect import flow, runtime
from prefect.artifacts import create_markdown_artifact

from artifacts import ledger
from flows import dispatch, ui
from artifacts.errors import ArtifactMissing
from artifacts.store import Store
from model.config import PipelineConfig
from model.errors import InputError
from tasks.prefect_task import make_task
from tasks.registry import STAGES, get
from tasks.report import MISSING_RUN, environment
from tasks.inputs import resolve as resolve_inputs
from tasks.runner import lookup
from tasks.stage import plan, upstream

TASKS = {st.name: make_task(st) for st in STAGES}
DISPATCH = {st.name: dispatch.make_dispatch_task(st) for st in STAGES}  # the same stages, run on the GPU pool


def _run_id() -> str:
    return str(runtime.flow_run.id)


def _start(config: PipelineConfig, store: str | None, card_of_this_run: bool,
           given: dict[str, str] | None = None) -> tuple[Store, PipelineConfig, dict[str, str], str]:
    """Record the run (config, origin, environment) and plan its keys. The report stage's key holds the run its
    card describes: this run (`card_of_this_run`, the pipeline), else the one the config names (a single-stage
    rerun of an earlier run's card). The config is copied, never changed in place: it is the flow's parameter.
    A stage run that a pipeline run handed over (execution.pools) writes its ledger rows under that run.
    `given`: stage -> key of artifacts that stand in for the planned ones (a stage run's `inputs`)."""
    st = Store(store)
    st.ensure_writable()
    config = config.model_copy(deep=True)
    env = environment()
    ui.tag_flow_run(ui.run_tags(config, env["gpus"]))
    run_id = None if card_of_this_run else _handed_over_by(st)
    if run_id is not None:
        return st, config, plan(STAGES, config, given), run_id  # the pipeline recorded the run
    run_id = _run_id()
    if card_of_this_run:
        config.report.run_id = run_id
    ledger.record_run(st, run_id, {
        "preset": config.preset, "started": datetime.now(timezone.utc).isoformat(),
        "host": socket.gethostname(), "config": config.model_dump(mode="json"),
        "flow_run_name": runtime.flow_run.name, "env": env,
    })
    return st, config, plan(STAGES, config, given), run_id


def _handed_over_by(st: Store) -> str | None:
    """The pipeline run this stage run is a subflow of, if that run recorded itself in the same store (so its
    summary and report card count the stage); None for a stage run of its own (the UI, `chatforge stage`)."""
    parent = runtime.flow_run.parent_flow_run_id
    if parent and st.fs.exists(st._p("runs", f"{parent}.json")):
        return str(parent)
    return None


# The signatures are the UI's run form (flows/ui.py): defaults a Quick run starts from, stage names as choices,
# and the `Args:` sections of the docstrings as the fields' descriptions (Prefect reads them from there).
@flow(name="chatforge", persist_result=False, validate_parameters=True, flow_run_name=ui.pipeline_run_name)
def pipeline(
    config: ui.Config = ui.DEFAULT_CONFIG,
    until: ui.StageName | None = ui.FULL_DAG,
    force: Sequence[ui.StageName] = (),
    store: str | None = "",
) -> dict[str, str]:
    """Run the DAG (up to `until`); finished stages come from the store. Returns stage → key.

    Args:
        config: Every stage's settings, one section per stage. The default is the `tiny` preset: offline, on a CPU,
            in minutes. A stage whose settings, inputs and code are unchanged comes back Cached from the store.
        until: Run this stage and the stages it needs, nothing after it. The default, the last stage (`report`),
            runs the whole DAG.
        force: Stages to recompute even though the store already has their artifacts.
        store: The artifact store every stage reads and writes: a path or an fsspec URL (s3://bucket/prefix),
            the same for every worker. Empty: $CHATFORGE_HOME, else ~/.cache/chatforge, on the machine of the run.
    """
    stages = upstream(STAGES, get(until).name) if until else STAGES
    pools = dispatch.check(config, stages, STAGES)  # an unknown pool or deployment fails here, before any work
    st, config, keys, run_id = _start(config, store, card_of_this_run=True)
    rows, states = [], {}
    for s in stages:
        forced = s.name in (force or [])
        # a GPU stage goes to the GPU pool unless the store has it: a cache hit needs no GPU (nor a GPU machine's start-up)
        away = pools is not None and dispatch.needs_gpu(s, config) and (forced or lookup(st, keys[s.name]) is None)
        task = DISPATCH[s.name] if away else TASKS[s.name]
        # wait_for: the run graph draws an edge from each input's task run, computed or Cached alike
        state = task(config, keys, run_id, st.url, force=forced, return_state=True,
                     wait_for=[states[i] for i in s.inputs if i in states])
        states[s.name] = state
        result = state.result()  # re-raises a failed stage's error, which fails the flow
        rows.append(f"| `{s.name}` | `{keys[s.name][:12]}` | {state.name} | {result.get('wall_seconds') or 0:.1f} s |")
    create_markdown_artifact(
        key="chatforge-run",
        markdown="| stage | key | state | compute wall |\n|---|---|---|---|\n" + "\n".join(rows),
        description=f"{config.preset}: stage keys",
    )
    return {s.name: keys[s.name] for s in stages}


@flow(name="chatforge-stage", persist_result=False, validate_parameters=True, flow_run_name=ui.stage_run_name)
def stage_flow(
    stage: ui.StageName,
    config: ui.Config = ui.DEFAULT_CONFIG,
    force: bool = False,
    store: str | None = "",
    inputs: dict[str, str] = {},  # noqa: B006 - the form's default; never changed
) -> str:
    """Run one stage; its inputs must already be in the store (rerun of a failed stage), or be given (`inputs`).

    Args:
        stage: The stage to run. Its inputs must be in the store already (from a pipeline run with the same config);
            a training stage resumes from its newest checkpoint.
        config: Every stage's settings, as in the pipeline run whose stage this reruns (its keys must match).
            The default is the `tiny` preset.
        force: Recompute the stage even though the store already has its artifact.
        store: The artifact store to read the inputs from and write the result to: a path or an fsspec URL.
            Empty: $CHATFORGE_HOME, else ~/.cache/chatforge, on the machine of the run.
        inputs: Artifacts to read instead of the ones the config plans, by input name: {"base": "import/org--repo"}
            starts `mid` from that checkpoint. Each is a ref, a key (or unique key prefix) or hf://org/repo, and must
            be of the kind the input's stage makes. The stage's key then derives from the artifacts it reads. Empty:
            every input as the config plans it.
    """
    s = get(stage)
    if s.section == "report" and not config.report.run_id:  # refused before anything is recorded
        raise InputError(MISSING_RUN)
    given = resolve_inputs(s, dict(inputs or {}), Store(store)) if inputs else {}  # checked before anything is recorded
    st, config, keys, run_id = _start(config, store, card_of_this_run=False, given=given)
    for name in s.inputs:
        if st.manifest(keys[name]) is None:
            raise ArtifactMissing(
                f"input {name!r} of stage {stage!r} (key {keys[name][:12]}) is not in {st.url}: "
                f"run `chatforge run --until {name}` with the same config first, or give one with --input {name}=REF"
            )
    TASKS[stage](config, keys, run_id, st.url, force=force)
    return keys[stage]
