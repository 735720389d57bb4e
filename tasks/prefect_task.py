"""Wrap a StageDef as a Prefect task.

Prefect's own result cache is off (NO_CACHE): the store decides what is cached, and a hit is
reported to Prefect as a `Cached` completed state so the UI shows it as such. The task run is named
after the stage. Each stage logs one readable line of metrics; its reports and tables become Prefect
artifacts -- also when it is cached, read from the store with a note saying so, so that a run whose
stages all come from the store still shows what they hold.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from artifacts.manifest import Manifest
from artifacts.store import Store
from model.config import PipelineConfig

from .runner import execute
from .stage import StageDef

REPORT_MAX_BYTES = 1 << 20  # a stored report larger than this is linked, not copied into the Prefect database


def make_task(st: StageDef):
    @task(name=st.name, task_run_name=st.name, cache_policy=NO_CACHE, persist_result=False, description=st.describe)
    def stage_task(cfg: PipelineConfig, keys: dict[str, str], run_id: str, store_url: str, force: bool = False):
        log = get_run_logger()
        store = Store(store_url)
        out = execute(st, cfg, store, keys, run_id, force=force, log=log.info)
        m = out.manifest
        log.info(metrics_line(st.name, m.key, m.metrics, cached=out.cache_hit, wall_seconds=m.wall_seconds))
        if out.cache_hit:
            _publish_cached(st, store, m)
        else:
            _publish(st, store.local_path(m.key))
        result = m.to_dict()
        if out.cache_hit:
            return Completed(name="Cached", data=result, message=f"{st.name} {m.key[:12]} from the store")
        return result

    return stage_task


def metrics_line(stage: str, key: str, metrics: dict, *, cached: bool, wall_seconds: float | None, limit: int = 6) -> str:
    """`base: computed 3fa2c1b0e9d2 in 1 m 12 s · val bpb 1.2345 · params 4,194,304 · steps 120 · ...`: the
    headline scores, then the stage's own numbers first (artifacts/report.py key_metrics), never a JSON dump."""
    from artifacts.report import key_metrics
    from artifacts.summary import headline, seconds, value

    how = f"cached {key[:12]} (made in {seconds(wall_seconds)})" if cached else f"computed {key[:12]} in {seconds(wall_seconds)}"
    shown, more = key_metrics(metrics, limit)
    parts = headline(metrics) + [f"{name} {_short(value(v))}" for name, v in shown.items()]
    tail = f" · +{more} more in `chatforge artifacts show {key[:12]}`" if more else ""
    return f"{stage}: {how}" + "".join(f" · {p}" for p in parts) + tail


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _artifact_key(st: StageDef, path: Path) -> str:
    return f"{st.name}-{path.stem}".lower().replace("_", "-")


def _publish(st: StageDef, artifact_dir: Path) -> None:
    for name in st.reports:
        path = artifact_dir / name
        if path.exists():
            create_markdown_artifact(key=_artifact_key(st, path), markdown=path.read_text(), description=f"{st.name}: {name}")
    for name in st.tables:
        path = artifact_dir / name
        if path.exists():
            create_table_artifact(key=_artifact_key(st, path), table=json.loads(path.read_text()), description=f"{st.name}: {name}")


def _publish_cached(st: StageDef, store: Store, m: Manifest) -> None:
    """A cached stage's reports and tables, read from the store (one file each: a remote store is not pulled),
    under the artifact keys a computed run uses, each report headed by where it is stored. A stage with no
    report gets one note, so that every cached stage links to what it holds."""
    made = (m.created or "")[:16].replace("T", " ")
    origin = f" (made {made} UTC{f' on {m.host}' if m.host else ''})" if made else ""
    published = False
    for name in st.reports:
        where, text = _stored(store, m, name)
        if where is None:
            continue
        note = (f"> **Cached**: `{st.name}` was not recomputed in this run. This is `{name}` of the stored artifact "
                f"`{m.key[:12]}`{origin}: `{where}`.\n\n")
        body = text if text is not None else f"(larger than {REPORT_MAX_BYTES >> 20} MB: open it there, or `chatforge artifacts show {m.key[:12]}`)"
        create_markdown_artifact(key=_artifact_key(st, Path(name)), markdown=note + body, description=f"{st.name}: {name} (cached)")
        published = True
    for name in st.tables:
        where, text = _stored(store, m, name)
        if text is not None:
            create_table_artifact(key=_artifact_key(st, Path(name)), table=json.loads(text), description=f"{st.name}: {name} (cached, {where})")
            published = True
    if not published:
        where = _location(store, store.artifact_dir(m.key))
        create_markdown_artifact(
            markdown=(f"> **Cached**: `{st.name}` was not recomputed in this run: its artifact `{m.key[:12]}`{origin} "
                      f"is at `{where}`.\n\n{metrics_line(st.name, m.key, m.metrics, cached=True, wall_seconds=m.wall_seconds)}\n\n"
                      f"`chatforge artifacts show {m.key[:12]}` lists its files and metrics."),
            description=f"{st.name}: cached artifact {m.key[:12]}",
        )


def _stored(store: Store, m: Manifest, name: str) -> tuple[str | None, str | None]:
    """(where the file is, its text unless too large), or (None, None) when the artifact has no such file."""
    info = m.files.get(name)
    if info is None:
        return None, None
    path = f"{store.artifact_dir(m.key)}/{name}"
    if info.get("size", 0) > REPORT_MAX_BYTES:
        return _location(store, path), None
    with store.fs.open(path, "rb") as f:
        return _location(store, path), f.read().decode("utf-8", "replace")


def _location(store: Store, path: str) -> str:
    """A path a person can open: the local path, or the store's URL form (s3://bucket/...)."""
    return path if store.local else store.fs.unstrip_protocol(path)
