"""Stages on the pools they need, as a team runs chatforge: a real Prefect server, two real process workers
(pool `chatforge-cpu`, and `chatforge-gpu` standing in for a GPU machine, each with a disk of its own), the
deployments of deploy/prefect.yaml applied with `prefect deploy --all`, runs triggered and retried through
the REST API the way the UI's buttons do.

1. `chatforge-pipeline` with `execution.pools` on and a local store; `base` (a training stage) goes to the
   GPU pool as a subflow run. Its training process is killed after its first checkpoint: the run fails with
   base's error. Retry (the UI's call): data and tokenizer come back Cached, base resumes from its
   checkpoint on the GPU worker, the run completes. The flow-run records say which worker/pool ran what.
2. The same flow on an S3 store (moto's server on 127.0.0.1): a run with pools (base on the GPU worker) and
   a run without (base in-process on the CPU worker) race for the same keys on two machines' disks: the
   ledger in the bucket has exactly one compute and one cache hit of each stage.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import RetryingClient, cli_env, free_port, sets_for, write_corpus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
BUCKET = "chatforge-pools"
WORKERS = {"chatforge-cpu": "cpu-machine", "chatforge-gpu": "gpu-machine"}
# base: long enough to be killed after its first checkpoint and to overlap a racing run, short on 2 cores
BASE = ["--set", "base.num_iterations=16", "--set", "base.checkpoint_every=4", "--set", "base.eval_every=16",
        "--set", "base.eval_tokens=512", "--set", "base.sample_every=16"]


# ---------------------------------------------------------------- the cluster: server, S3, two workers, deployments

def _wait(fn, timeout: float, what: str, every: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    def __init__(self, api: str, root: Path, env: dict):
        self.api, self.root, self.env = api, root, env
        self.http = RetryingClient(base_url=api, timeout=10)
        self.workers: dict[str, subprocess.Popen] = {}

    def start_worker(self, pool: str) -> None:
        """A worker as on its own machine: its own HOME, so its own local disk (staging, locks, pulled copies)."""
        home = self.root / WORKERS[pool]
        home.mkdir()
        log = open(self.root / f"{WORKERS[pool]}.log", "w")
        self.workers[pool] = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", WORKERS[pool]],
            env={**self.env, "HOME": str(home)}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def log(self, pool: str) -> str:
        return (self.root / f"{WORKERS[pool]}.log").read_text()[-4000:]

    def stop(self) -> None:
        for proc in self.workers.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.workers.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def deployment(self, name: str) -> dict:
        r = self.http.get(f"/deployments/name/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def trigger(self, config: dict, store: str, until: str) -> str:
        dep = self.deployment("chatforge/chatforge-pipeline")
        r = self.http.post(f"/deployments/{dep['id']}/create_flow_run",
                           json={"parameters": {"config": config, "until": until, "store": store}})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.http.get(f"/flow_runs/{run_id}").json()

    def finish(self, run_id: str, timeout: float = 240) -> dict:
        def done():
            run = self.flow_run(run_id)
            return run if run["state"] and run["state"]["type"] in FINAL else None

        return _wait(done, timeout, f"flow run {run_id} to finish", every=1)

    def retry(self, run_id: str) -> None:
        """What the UI's Retry button sends (prefect-ui-library flowRuns.retryFlowRun)."""
        r = self.http.post(f"/flow_runs/{run_id}/set_state", json={
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True})
        assert r.status_code in (200, 201) and r.json()["status"] == "ACCEPT", r.text

    def subflows(self, run_id: str) -> list[dict]:
        r = self.http.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}},
                                                       "sort": "EXPECTED_START_TIME_ASC"})
        return r.json()

    def logs(self, run_id: str) -> list[str]:
        r = self.http.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        return [entry["message"] for entry in r.json()]

    def task_runs(self, run_id: str) -> list[dict]:
        r = self.http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})
        return r.json()


@pytest.fixture(scope="module")
def s3_env():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:%d" % server.get_host_and_port()[1], "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, key="test", secret="test",
                           client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
    fs.mkdir(BUCKET)
    yield env, fs
    server.stop()


def create_pools(api: str) -> None:
    """The two process pools, as `prefect work-pool create NAME --type process` makes them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for pool in WORKERS:
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:
                pass


@pytest.fixture(scope="module")
def cluster(prefect_server, s3_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    # workers poll every second (default 10) so the test does not wait on the schedule
    env = {**cli_env(prefect_server), **s3_env[0], "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1"}
    c = Cluster(prefect_server, root, env)
    t0 = time.perf_counter()
    try:
        create_pools(prefect_server)
        # the workers start while `prefect deploy --all` applies deploy/prefect.yaml (both take seconds)
        deploy = subprocess.Popen([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=ROOT / "deploy",
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pool in WORKERS:
            c.start_worker(pool)

        def online():
            for pool, name in WORKERS.items():
                if c.workers[pool].poll() is not None:
                    raise AssertionError(f"worker {name} exited: {c.log(pool)}")
                r = c.http.post(f"/work_pools/{pool}/workers/filter", json={})
                if r.status_code != 200 or not any(w["name"] == name for w in r.json()):
                    return False
            return True

        _wait(online, 120, "both workers online")
        c.startup = {"workers": time.perf_counter() - t0}
        out, _ = deploy.communicate(timeout=180)
        assert deploy.returncode == 0, out[-3000:]
        c.startup["deploy"] = time.perf_counter() - t0
        assert c.deployment("chatforge-stage/chatforge-stage")["work_pool_name"] == "chatforge-gpu"
        assert c.deployment("chatforge/chatforge-pipeline")["work_pool_name"] == "chatforge-cpu"
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs=800)


def config(corpus: Path, *extra: str) -> dict:
    from flows.overrides import build_config

    args = [*sets_for(corpus, vocab=600), *BASE, *extra]
    return build_config("tiny", [a for a in args if a != "--set"]).model_dump(mode="json")


def planned(cfg: dict) -> dict[str, str]:
    from model.config import PipelineConfig
    from tasks.registry import STAGES
    from tasks.stage import plan

    return plan(STAGES, PipelineConfig.model_validate(cfg))


def stage_of(task_run: dict) -> str | None:
    """The stage a task run ran (its name is the stage's, perhaps with Prefect's `-N` suffix), or None."""
    from tasks.registry import STAGES

    names = [s.name for s in STAGES if task_run["name"] == s.name or task_run["name"].startswith(s.name + "-")]
    return max(names, key=len) if names else None


def kill_training(key: str) -> int:
    """SIGKILL the base training process(es) computing `key` (found by the spec path, under the key's wip dir)."""
    killed = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "model.train.base" in cmd and key in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


# ---------------------------------------------------------------- 1. fail on the GPU pool, retry, resume, complete

def test_gpu_stage_on_the_gpu_worker_fails_then_retry_resumes_it(cluster, corpus, tmp_path):
    store = tmp_path / "store"
    cfg = config(corpus, "--set", "execution.pools=true")
    key = planned(cfg)["base"]
    t0 = time.perf_counter()
    run_id = cluster.trigger(cfg, str(store), until="base")

    # the failure: base's training process dies (OOM killer, preemption) after its first checkpoint
    wip = store / "wip" / key
    _wait(lambda: any(wip.glob("step-*")), 240, "base's first checkpoint on the GPU worker", every=0.1)
    assert _wait(lambda: kill_training(key), 10, "base's training process", every=0.05)
    failed = cluster.finish(run_id)
    assert failed["state"]["type"] == "FAILED", (failed["state"], cluster.log("chatforge-gpu"))
    msg = failed["state"]["message"]
    assert "base" in msg and "gpu-machine" in msg and "chatforge-gpu" in msg, msg
    t_fail = time.perf_counter() - t0

    t1 = time.perf_counter()
    cluster.retry(run_id)
    done = cluster.finish(run_id)
    assert done["state"]["type"] == "COMPLETED", (done["state"], cluster.log("chatforge-cpu"), cluster.log("chatforge-gpu"))
    assert done["run_count"] == 2
    t_retry = time.perf_counter() - t1

    # the pipeline ran on the CPU pool's worker; base, both times, as a chatforge-stage subflow on the GPU pool's
    assert done["labels"]["prefect.work-pool.name"] == "chatforge-cpu"
    assert done["labels"]["prefect.worker.name"] == "cpu-machine"
    subs = cluster.subflows(run_id)
    gpu = cluster.deployment("chatforge-stage/chatforge-stage")
    assert [s["state"]["type"] for s in subs] == ["FAILED", "COMPLETED"]
    for s in subs:
        assert s["deployment_id"] == gpu["id"] and s["parameters"]["stage"] == "base"
        assert s["labels"]["prefect.work-pool.name"] == "chatforge-gpu"
        assert s["labels"]["prefect.worker.name"] == "gpu-machine"

    # first attempt: data and tokenizer computed, base failed; the retry: both Cached, base completed
    states = [(stage_of(t), t["state"]["name"]) for t in cluster.task_runs(run_id) if stage_of(t)]
    assert states == [("data", "Completed"), ("tokenizer", "Completed"), ("base", "Failed"),
                      ("data", "Cached"), ("tokenizer", "Cached"), ("base", "Completed")], states

    # base resumed from the checkpoint the killed process wrote, and its ledger rows belong to the pipeline run
    manifest = json.loads((store / "artifacts" / key / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from"] and manifest["metrics"]["resumed_from"][0] >= 4
    rows = [json.loads(p.read_text()) for p in sorted((store / "ledger" / run_id).glob("*.json"))]
    assert sorted((r["stage"], r["cache_hit"], r["status"]) for r in rows) == sorted([
        ("data", False, "completed"), ("tokenizer", False, "completed"), ("base", False, "failed"),
        ("data", True, "completed"), ("tokenizer", True, "completed"), ("base", False, "completed")])
    print(f"\nstart-up: workers online {cluster.startup['workers']:.1f} s, deployed {cluster.startup['deploy']:.1f} s; "
          f"triggered run to failure {t_fail:.1f} s, retry to completion {t_retry:.1f} s")


# ---------------------------------------------------------------- 2. S3 store, two machines racing for the same keys

def test_two_workers_race_for_the_same_keys_on_s3(cluster, corpus, s3_env):
    _, fs = s3_env
    store = f"s3://{BUCKET}/store"
    with_pools = config(corpus, "--set", "execution.pools=true")
    in_process = config(corpus)  # the same keys: where a stage runs is not part of any key
    keys = planned(with_pools)
    assert keys == planned(in_process)

    # meanwhile, a run that names a pool nobody created fails at once, saying so and how to fix it
    bad = cluster.trigger(config(corpus, "--set", 'execution.pools={"cpu":"chatforge-cpu","gpu":"no-such-pool"}'),
                          store, until="base")
    # a form value the parameter schema forbids: the API refuses the run, naming the field (the UI's form shows it)
    wrong = config(corpus)
    wrong["tokenizer"]["vocab_size"] = 5
    dep = cluster.deployment("chatforge/chatforge-pipeline")
    r = cluster.http.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": {"config": wrong, "store": store}})
    assert r.status_code == 409 and "vocab_size" in r.text and "265" in r.text, r.text
    t0 = time.perf_counter()
    first = cluster.trigger(with_pools, store, until="base")
    # the second run starts when the first hands base to the GPU pool: both machines then reach base within
    # seconds of each other, each with its own disk (no shared flock), and one of them has to wait
    _wait(lambda: cluster.subflows(first), 240, "base's subflow run", every=0.2)
    second = cluster.trigger(in_process, store, until="base")
    runs = {run_id: cluster.finish(run_id) for run_id in (first, second)}
    for run in runs.values():
        assert run["state"]["type"] == "COMPLETED", (run["state"], cluster.log("chatforge-cpu"), cluster.log("chatforge-gpu"))
    elapsed = time.perf_counter() - t0
    refused = cluster.finish(bad)
    assert refused["state"]["type"] == "FAILED"
    why = ("unknown work pool 'no-such-pool' (execution.pools.gpu) on http://127.0.0.1:",
           "create it with `prefect work-pool create no-such-pool --type process`")
    assert all(part in refused["state"]["message"] for part in why), refused["state"]["message"]
    assert any(all(part in m for part in why) for m in cluster.logs(bad))  # the run's log says it too
    assert cluster.subflows(bad) == [] and not fs.exists(f"{BUCKET}/store/runs/{bad}.json")  # refused before any work

    (sub,) = cluster.subflows(first)
    assert sub["labels"]["prefect.work-pool.name"] == "chatforge-gpu" and sub["parameters"]["stage"] == "base"
    assert cluster.subflows(second) == []  # without pools, base ran inside the run on the CPU worker
    assert runs[second]["labels"]["prefect.worker.name"] == "cpu-machine"

    rows = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{BUCKET}/store/ledger/*/*.json")]
    for stage in ("data", "tokenizer", "base"):
        hits = sorted(r["cache_hit"] for r in rows if r["stage"] == stage)
        assert hits == [False, True], (stage, [(r["run_id"], r["cache_hit"]) for r in rows if r["stage"] == stage])
    waited = [run_id for run_id in (sub["id"], second)
              if any(f"another process is computing {keys['base'][:12]}; waiting" in m for m in cluster.logs(run_id))]
    # usually they overlap: one computes, the other waits for it, then hits; on a loaded machine the second may reach
    # base only after the first committed it (a plain hit, no wait). Never both waiting, and base computed once (above).
    assert len(waited) <= 1, waited
    loser = first if waited == [sub["id"]] else second
    assert [t["state"]["name"] for t in cluster.task_runs(loser) if stage_of(t) == "base"] == ["Cached"]
    assert fs.exists(f"{BUCKET}/store/artifacts/{keys['base']}/manifest.json")
    assert fs.glob(f"{BUCKET}/store/leases/*.json") == []  # every lease released, none left to expire
    # the two also met at the key's Prefect concurrency limit (one slot), created on first use, now free again
    limit = cluster.http.get(f"/v2/concurrency_limits/chatforge-key-{keys['base']}").json()
    assert (limit["limit"], limit["active_slots"]) == (1, 0), limit
    print(f"\nS3 race: both runs complete in {elapsed:.1f} s")
