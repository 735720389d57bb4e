"""What a stage is, to the orchestrator, and how the DAG's keys are planned before anything runs."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from artifacts.keys import artifact_key, code_fingerprint
from model.config import PipelineConfig, Section


@dataclass
class StageContext:
    """What a stage's compute function gets besides its config."""

    inputs: dict[str, Path]  # input stage name -> local artifact directory
    out_dir: Path  # empty staging directory to write the artifact into
    download_dir: Path  # shared download cache (not part of any artifact)
    wip_dir: Path  # resumable work in progress for this key
    log: Callable[[str], None] = print
    device: dict = field(default_factory=lambda: {"type": "cpu", "count": 1, "nodes": 1})
    store_url: str = ""  # the store the run writes to: for a stage that reads the ledger (report), not for artifacts


@dataclass(frozen=True)
class StageDef:
    name: str
    kind: str  # the artifact kind it produces
    section: str  # attribute of PipelineConfig holding its config
    inputs: tuple[str, ...]  # upstream stage names
    code: tuple[str, ...]  # modules whose source is fingerprinted into the key
    compute: Callable[[Section, StageContext], dict]  # fills ctx.out_dir, returns metrics
    describe: str = ""
    reports: tuple[str, ...] = ()  # markdown files in the artifact shown as Prefect artifacts
    tables: tuple[str, ...] = ()  # JSON files (a list of row dicts) in the artifact shown as Prefect table artifacts
    # what the config names but does not contain (a local directory's files): hashed into the key
    fingerprint: Callable[[Section], dict] | None = None
    # how to give the stage data it lacked (an evalset with no source): printed with a suite that did not run
    missing_data_hint: str = ""

    def config(self, cfg: PipelineConfig) -> Section:
        return getattr(cfg, self.section)

    def key(self, cfg: PipelineConfig, input_keys: dict[str, str]) -> str:
        config = self.config(cfg).key_dict()
        if self.fingerprint is not None:
            config = {**config, "content": self.fingerprint(self.config(cfg))}
        return artifact_key(self.name, config, input_keys, code_fingerprint(self.code))


def plan(stages: list[StageDef], cfg: PipelineConfig, given: Mapping[str, str] | None = None) -> dict[str, str]:
    """Keys of every stage, in order, from the config alone (no store access). `given` (stage name -> key) puts an
    artifact in place of the one a stage would make (`chatforge stage mid --input base=REF`, tasks/inputs.py): that
    stage's key is the given one, and every key after it derives from it, so that a stage's key, and the parents in
    its manifest, name the artifacts it actually reads."""
    given = given or {}
    keys: dict[str, str] = {}
    for st in stages:
        keys[st.name] = given[st.name] if st.name in given else st.key(cfg, {i: keys[i] for i in st.inputs})
    return keys


def upstream(stages: list[StageDef], target: str) -> list[StageDef]:
    """`target` and everything it depends on, in DAG order."""
    by_name = {s.name: s for s in stages}
    need, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo += list(by_name[name].inputs)
    return [s for s in stages if s.name in need]
