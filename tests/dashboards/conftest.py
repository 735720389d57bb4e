"""A store made by real runs through the CLI, shared by the dashboard tests (built once per session).

Four runs against one Prefect server, at a CPU price of $10 per process-hour so that dollars are not all zero:
  1. `--until base_eval` (data, core_evalset, tokenizer, base, base_eval: a CORE-3 (partial) score);
  2. the same again: every stage a cache hit ($0, with the dollars it saved);
  3. a longer base training: data, core_evalset and tokenizer hit, base and base_eval computed (another triple);
  4. an empty corpus: the data stage fails (a failed ledger row).
Runs 1 and 4 go side by side, then 2 and 3: the machine has 2 cores, and each CLI spends most of its first
seconds importing. About 80-110 s on 2 shared cores (see the time printed under -s).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import cli_env, sets_for, shared_data, write_corpus

ROOT = Path(__file__).resolve().parents[2]
CORE_TASKS = ("copa", "bigbench_operators", "winograd_wsc")  # small files, three CORE task types
PRICE = "cost.prices.cpu=10"
FAST_BASE = ["--set", "base.eval_every=4", "--set", "base.eval_tokens=512", "--set", "base.sample_every=4",
             "--set", "base.checkpoint_every=100", "--set", "base_eval.bpb_tokens=512", "--set", "base_eval.max_per_task=16"]


@dataclass
class FixtureStore:
    path: Path
    first: str    # run 1: computed to base_eval
    cached: str   # run 2: the same config, all cache hits
    longer: str   # run 3: base.num_iterations changed
    failed: str   # run 4: the data stage failed
    seconds: float


def _run_id(stdout: str) -> str:
    import re

    m = re.search(r"── chatforge run ([0-9a-f-]{36}) ", stdout)
    assert m, stdout[-3000:]
    return m[1]


def _start(store: Path, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--store", str(store), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)


def _finish(proc: subprocess.Popen, log: Path, ok: bool = True) -> str:
    out, _ = proc.communicate(timeout=300)
    assert (proc.returncode == 0) == ok, f"exit {proc.returncode}: {log.read_text()[-3000:]}"
    return out


def build_store(root: Path, api_url: str) -> FixtureStore:
    t0 = time.perf_counter()
    store = root / "store"
    corpus = write_corpus(root / "docs.jsonl", docs=1200)
    core = root / "core"
    core.mkdir()
    for task in CORE_TASKS:
        shutil.copy(shared_data() / "eval" / "core" / f"{task}.jsonl", core / f"{task}.jsonl")
    env = {**cli_env(api_url), "OMP_NUM_THREADS": "1"}
    common = [*sets_for(corpus), *FAST_BASE, "--set", f"core_evalset.local_dir={core}", "--set", PRICE,
              "--until", "base_eval"]
    empty = root / "empty.jsonl"
    empty.write_text("")
    bad_source = json.dumps([{"kind": "local", "paths": [str(empty)]}], separators=(",", ":"))

    first = _start(store, [*common, "--set", "base.num_iterations=4"], env, root / "run1.log")
    failing = _start(store, ["--set", f"data.sources={bad_source}", "--set", PRICE, "--until", "data"], env, root / "run4.log")
    first_id = _run_id(_finish(first, root / "run1.log"))
    _finish(failing, root / "run4.log", ok=False)
    assert "produced no documents" in (root / "run4.log").read_text()

    cached = _start(store, [*common, "--set", "base.num_iterations=4"], env, root / "run2.log")
    longer = _start(store, [*common, "--set", "base.num_iterations=6"], env, root / "run3.log")
    cached_id = _run_id(_finish(cached, root / "run2.log"))
    longer_id = _run_id(_finish(longer, root / "run3.log"))
    failed_id = next(p.name for p in (store / "ledger").iterdir() if p.name not in {first_id, cached_id, longer_id})
    return FixtureStore(store, first_id, cached_id, longer_id, failed_id, time.perf_counter() - t0)


@pytest.fixture(scope="session")
def fixture_store(tmp_path_factory, prefect_server) -> FixtureStore:
    fs = build_store(tmp_path_factory.mktemp("dashboard-store"), prefect_server)
    print(f"\ndashboard fixture store: 4 runs in {fs.seconds:.1f} s")
    return fs


@pytest.fixture
def store_copy(fixture_store, tmp_path) -> Path:
    """A private copy of the fixture store, for tests that damage it."""
    dest = tmp_path / "store"
    shutil.copytree(fixture_store.path, dest)
    return dest


@pytest.fixture(autouse=True)
def _private_catalog_cache(tmp_path, monkeypatch):
    """Each test's catalog cache lives in its own CHATFORGE_HOME, so tests never share a DuckDB file."""
    monkeypatch.setenv("CHATFORGE_HOME", str(tmp_path / "home"))
    os.makedirs(tmp_path / "home", exist_ok=True)
