"""Wrap a StageDef as a Prefect task.

Prefect's own result cache is off (NO_CACHE): the store decides what is cached, and a hit is
reported to Prefect as a `Cached` completed state so the UI shows it as such.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from artifacts.store import Store
from model.config import PipelineConfig

from .runner import execute
from .stage import StageDef


def make_task(st: StageDef):
    @task(name=st.name, cache_policy=NO_CACHE, persist_result=False, description=st.describe)
    def stage_task(cfg: PipelineConfig, keys: dict[str, str], run_id: str, store_url: str, force: bool = False):
        log = get_run_logger()
        store = Store(store_url)
        out = execute(st, cfg, store, keys, run_id, force=force, log=log.info)
        if not out.cache_hit:
            _publish(st, store.local_path(out.manifest.key))
        result = out.manifest.to_dict()
        if out.cache_hit:
            return Completed(name="Cached", data=result, message=f"{st.name} {out.manifest.key[:12]} from the store")
        return result

    return stage_task


def _publish(st: StageDef, artifact_dir: Path) -> None:
    for name in st.reports:
        path = artifact_dir / name
        if path.exists():
            create_markdown_artifact(
                key=f"{st.name}-{path.stem}".lower().replace("_", "-"),
                markdown=path.read_text(),
                description=f"{st.name}: {name}",
            )
    for name in st.tables:
        path = artifact_dir / name
        if path.exists():
            create_table_artifact(
                key=f"{st.name}-{path.stem}".lower().replace("_", "-"),
                table=json.loads(path.read_text()),
                description=f"{st.name}: {name}",
            )
