"""deploy/: what `prefect deploy --all` reads, checked without a server (test_server.py deploys it for real)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from flows.worker import POOLS, enter_checkout

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_declares_both_deployments_on_their_pools():
    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert {n: (d["entrypoint"], d["work_pool"]["name"]) for n, d in deps.items()} == {
        "chatforge-pipeline": ("flows.pipeline:pipeline", "chatforge-cpu"),
        "chatforge-stage": ("flows.pipeline:stage_flow", "chatforge-gpu"),
    }
    assert set(POOLS) == {d["work_pool"]["name"] for d in deps.values()}
    for d in deps.values():  # heartbeats often enough for the automation's window (Prefect's minimum is 30 s)
        assert d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    from prefect.utilities.importtools import import_object

    for d in deps.values():  # what `prefect deploy` and each worker import: the flows themselves
        assert import_object(d["entrypoint"]).name in ("chatforge", "chatforge-stage")
    assert spec["pull"] == [{"flows.worker.enter_checkout": {}}]


def test_the_pull_step_enters_this_machines_checkout(tmp_path):
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert enter_checkout() == {"directory": str(ROOT)} and Path.cwd() == ROOT
    finally:
        os.chdir(here)


def test_the_kubernetes_template_defines_every_placeholder_it_uses():
    template = json.loads((ROOT / "deploy" / "k8s" / "base-job-template.json").read_text())
    used = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(template["job_configuration"])))
    defined = set(template["variables"]["properties"])
    assert used <= defined, used - defined
    manifest = template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "prefect-job" and container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["env"]["default"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
