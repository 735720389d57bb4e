"""Stages on the pool they need (`execution.pools`).

The pipeline flow runs on a worker of the CPU pool. Each stage that needs a GPU (`needs_gpu`) and is not in
the store yet is handed to the single-stage deployment on the GPU pool with `run_deployment(as_subflow=True)`:
the UI shows it under the pipeline's run, a cancel of the pipeline reaches it, and the flow-run record says
which worker of which pool ran it (the labels `prefect.worker.name`, `prefect.work-pool.name`). The result of
the stage is what the store holds afterwards: the committed artifact under the key the pipeline planned,
never a value passed back through Prefect (the two processes share nothing else).
"""
from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from artifacts.errors import ArtifactMissing
from artifacts.store import Store
from model.config import PipelineConfig, WorkPools
from model.errors import InputError
from tasks.prefect_task import metrics_line
from tasks.runner import lookup
from tasks.stage import StageDef

POLL_SECONDS = 2  # how often the pipeline asks the API whether a dispatched stage finished


class StageRunFailed(RuntimeError):
    """The stage's flow run on the other pool did not complete; the message carries its error."""


def needs_gpu(st: StageDef, cfg: PipelineConfig) -> bool:
    """Whether `st` goes to the GPU pool: `execution.gpu_stages` when given, else from the stage's `device`
    setting: `cuda` always; `auto` for the training stages (kind `checkpoint`: base, mid, sft, rl), whose
    cost is GPU-bound; evals on `auto` stay on the CPU pool (set their device to `cuda` to move them);
    stages with no device setting (data, tokenizer, eval sets, mixtures, decontam, report) never."""
    names = cfg.execution.gpu_stages
    if names is not None:
        return st.name in names
    device = getattr(st.config(cfg), "device", None)
    return device == "cuda" or (device == "auto" and st.kind == "checkpoint")


def check(cfg: PipelineConfig, stages: list[StageDef], all_stages: list[StageDef]) -> WorkPools | None:
    """Before anything runs: the pools, the stage deployment and the stage names exist. Returns the pools."""
    ex = cfg.execution
    known = [s.name for s in all_stages]
    unknown = [n for n in ex.gpu_stages or [] if n not in known]
    if unknown:
        raise InputError(f"execution.gpu_stages names unknown stage(s) {', '.join(map(repr, unknown))}: "
                         f"the stages are {', '.join(known)}")
    pools = ex.pool_names()
    if pools is None:
        return None
    from tasks.locks import prefect_api

    api = prefect_api()
    if not api:
        raise InputError("execution.pools is on but no Prefect API is configured, so no worker could pick a stage up: "
                         "start `chatforge server` or set PREFECT_API_URL to the server your workers poll")
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for role, name in (("cpu", pools.cpu), ("gpu", pools.gpu)):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                raise InputError(f"unknown work pool {name!r} (execution.pools.{role}) on {api}: create it with "
                                 f"`prefect work-pool create {name} --type process` (`chatforge server` creates both pools), "
                                 "or name an existing pool") from None
        if not any(needs_gpu(s, cfg) for s in stages):
            return pools
        try:
            dep = client.read_deployment_by_name(ex.stage_deployment)
        except ObjectNotFound:
            raise InputError(f"no deployment {ex.stage_deployment!r} on {api} (execution.stage_deployment): run "
                             "`prefect deploy --all` in deploy/ (or `chatforge server`)") from None
        if dep.work_pool_name != pools.gpu:
            raise InputError(f"deployment {ex.stage_deployment!r} runs on pool {dep.work_pool_name!r}, not on the GPU pool "
                             f"{pools.gpu!r}: set its work_pool in deploy/prefect.yaml, or execution.pools.gpu to its pool")
    return pools


def _has_worker(pool: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkPoolStatus

    with get_client(sync_client=True) as client:
        return client.read_work_pool(pool).status == WorkPoolStatus.READY  # READY: a worker polled recently


def _came_from_store(flow_run_id, stage: str) -> bool:
    """Whether the stage's task in that flow run ended `Cached` (as tasks/prefect_task.py reports a hit)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return any(t.name == stage and t.state is not None and t.state.name == "Cached" for t in runs)


def make_dispatch_task(st: StageDef):
    """A task named like the stage (so the run graph reads the same either way) that runs it on the GPU pool."""

    @task(name=st.name, task_run_name=st.name, cache_policy=NO_CACHE, persist_result=False,
          description=f"{st.describe} (on the GPU pool)")
    def dispatched(cfg: PipelineConfig, keys: dict[str, str], run_id: str, store_url: str, force: bool = False) -> dict:
        from prefect.deployments import run_deployment

        log = get_run_logger()
        ex, key = cfg.execution, keys[st.name]
        pools = ex.pool_names()
        log.info(f"{st.name}: {key[:12]} goes to {ex.stage_deployment} on pool {pools.gpu}")
        if not _has_worker(pools.gpu):  # not an error: a worker may be on its way (an autoscaled GPU node)
            log.warning(f"{st.name}: no worker of pool {pools.gpu} is online; the stage waits until one starts "
                        f"(`chatforge worker --pool {pools.gpu}` on a GPU machine, pointed at this Prefect API)")
        run = run_deployment(
            ex.stage_deployment, as_subflow=True, poll_interval=POLL_SECONDS,
            parameters={"stage": st.name, "config": cfg.model_dump(mode="json"), "store": store_url, "force": force},
        )
        where = (f"flow run {run.name!r} on worker {run.labels.get('prefect.worker.name', '?')} of pool "
                 f"{run.labels.get('prefect.work-pool.name', run.work_pool_name or '?')}")
        if run.state is None or not run.state.is_completed():
            state = run.state.name if run.state else "no state"
            raise StageRunFailed(f"{st.name} ended {state} in {where}: {run.state.message if run.state else ''}".rstrip(": "))
        m = lookup(Store(store_url), key, log=log.warning)
        if m is None:
            raise ArtifactMissing(
                f"{st.name}: {where} completed but {key[:12]} is not in {store_url}: every worker must reach the same "
                "store (an object store or a shared filesystem at the same path) and run the same chatforge code"
            )
        cached = _came_from_store(run.id, st.name)  # it lost a race for the key: another worker made it meanwhile
        log.info(f"{st.name}: {key[:12]} {'found in the store' if cached else 'committed'} by {where}")
        log.info(metrics_line(st.name, key, m.metrics, cached=cached, wall_seconds=m.wall_seconds))
        if cached:
            return Completed(name="Cached", data=m.to_dict(), message=f"{st.name} {key[:12]} from the store")
        return m.to_dict()

    return dispatched
