"""Bad input through the real CLI, as a table: every case ends with exit status 1 and one line,
`chatforge: error: ...` naming the field to change, as the last thing on the terminal; no traceback (Prefect's stay in
the run's logs on the server); and the store as it was -- no artifact, no ref, no staging, no checkpoint.

Sizes outside the config's bounds fail before Prefect starts (no server needed). The other cases get past the config
and fail inside a stage, after Prefect started: the tokenizer's preflight (more vocabulary than the text can give)
and base's (a model this machine cannot hold); they prove that a failing stage's error reaches the terminal as the
one line, without the tracebacks Prefect logs for a failed task and flow run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from artifacts import catalog
from artifacts.store import Store
from helpers import cli_env, sets_for, write_corpus

ROOT = Path(__file__).resolve().parents[2]


def cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI, stderr into stdout in the order written: what a terminal shows."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, text=True, timeout=timeout, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def tree(store: Path) -> dict[str, bytes]:
    """Every file under the store with its bytes: for the config cases, nothing at all may change."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def committed(store: Path) -> dict[str, bytes]:
    """The artifacts' files and what each ref points at: what a failed stage may not change (it may add its run
    record and ledger row, and a cached stage before it touches its refs' time)."""
    out = {k: v for k, v in tree(store).items() if k.startswith("artifacts/")}
    out.update({str(p.relative_to(store)): json.loads(p.read_text())["key"].encode() for p in (store / "refs").rglob("*.json")})
    return out


def assert_one_line(out: str, *fragments: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("chatforge: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out[-3000:]
    assert "Traceback" not in out and "Encountered exception" not in out and "failed with exception" not in out, out[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("bad-input") / "docs.jsonl", docs=300)


# ---------------------------------------------------------------- refused by the config: before Prefect starts

CONFIG_CASES = [
    ("tokenizer.vocab_size=1000000000000", "bad value for tokenizer.vocab_size: Input should be less than or equal to 1048576"),
    ("base.device_batch_size=0", "bad value for base.device_batch_size: Input should be greater than or equal to 1 (got 0)"),
    ("base.depth=100000", "bad value for base.depth: Input should be less than or equal to 256 (got 100000)"),
    ("base.max_seq_len=100000000", "bad value for base.max_seq_len: Input should be less than or equal to 1048576"),
    ("base.total_batch_size=1000", "base.total_batch_size=1000 is not a multiple of base.device_batch_size × base.max_seq_len"),
    ("base.engine=deepspeed", "bad value for base: base.grad_clip=1.0 with base.engine=deepspeed: DeepSpeed's Muon clips"),
]


def test_sizes_out_of_bounds_are_one_line_before_anything_runs(corpus, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "keep.txt").write_text("the store before the run")
    before = tree(store)
    # no Prefect server at all: a case that got past the config would fail differently, not start one
    env = {**cli_env("http://127.0.0.1:9/api"), "PREFECT_HOME": str(tmp_path / "prefect")}
    for setting, message in CONFIG_CASES:
        r = cli(["run", "--preset", "tiny", "--store", str(store), *sets_for(corpus), "--set", setting], env, timeout=120)
        assert r.returncode == 1, (setting, r.stdout[-3000:])
        line = assert_one_line(r.stdout, message)
        assert r.stdout.strip() == line  # the whole output: nothing else ran
        assert tree(store) == before and not (tmp_path / "prefect").exists()


# ---------------------------------------------------------------- refused inside a stage: after Prefect started

@pytest.fixture(scope="module")
def env(prefect_server):
    return cli_env(prefect_server)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, env) -> Path:
    """A store with the data and tokenizer artifacts of a small run: the stage cases start from copies of it."""
    store = tmp_path_factory.mktemp("bad-input-ref") / "store"
    r = cli(["run", "--preset", "tiny", "--store", str(store), "--until", "tokenizer", *sets_for(corpus, vocab=512)], env)
    assert r.returncode == 0, r.stdout[-3000:]
    return store


STAGE_CASES = [
    # 300 short documents hold ~130,000 bytes: BPE cannot learn a million tokens from them (the trainer would abort)
    ("tokenizer", ["--until", "tokenizer", "--set", "tokenizer.vocab_size=1000000"],
     ["tokenizer.vocab_size=1000000 is more than BPE can learn from the training text", "lower tokenizer.vocab_size"]),
    # within the bounds, but ~9,000 GiB of weights and optimizer state: no machine this runs on holds it
    ("base", ["--until", "base", "--set", "base.depth=256"],
     ["base.depth=256 needs ~", " GiB (params+optimizer ", "activations ", " GiB at device_batch_size=4, max_seq_len=64)) but "
      "this machine has ", " GiB of memory available: lower base.depth"]),
]


@pytest.mark.parametrize("stage, args, fragments", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_a_stage_refusing_its_input_is_one_line_without_prefect_tracebacks(stage, args, fragments, reference, corpus, env,
                                                                          prefect_server, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    before = committed(store)
    r = cli(["run", "--preset", "tiny", "--store", str(store), *sets_for(corpus, vocab=512), *args], env)
    assert r.returncode == 1, r.stdout[-3000:]
    line = assert_one_line(r.stdout, *fragments)
    assert f"Task run '{stage}' - Finished in state Failed(" in r.stdout  # Prefect still says which stage failed
    assert committed(store) == before
    assert not any((store / "tmp").iterdir())  # no staging left behind
    assert not list((store / "wip").glob("*/step-*"))  # no checkpoint of a run that never started
    # the ledger has the failed stage, with the error
    con = catalog.connect(Store(str(store)))
    rows = con.execute("select run_id, stage, status, error from stage_runs where status = 'failed'").fetchall()
    assert [(s, st) for _, s, st, _ in rows] == [(stage, "failed")] and line.split(": error: ", 1)[1][:80] in rows[0][3]
    # ... and the tracebacks the terminal did not show are in the run's logs on the Prefect server
    logs = httpx.post(f"{prefect_server}/logs/filter", json={"logs": {"flow_run_id": {"any_": [str(rows[0][0])]}}},
                      timeout=30).json()
    assert any("Traceback" in log["message"] for log in logs), [log["message"][:200] for log in logs]


def test_config_errors_need_no_server_either_way(corpus, tmp_path):
    """`chatforge stage` takes the same path: a bad size is one line before any server is looked for."""
    env = {**cli_env("http://127.0.0.1:9/api"), "PREFECT_HOME": str(tmp_path / "prefect")}
    r = cli(["stage", "base", "--store", str(tmp_path / "store"), *sets_for(corpus), "--set", "base.depth=100000"], env,
            timeout=120)
    assert r.returncode == 1
    assert_one_line(r.stdout, "bad value for base.depth")
    assert not (tmp_path / "store").exists()
