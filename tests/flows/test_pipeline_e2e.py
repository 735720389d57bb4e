"""The pipeline through the real CLI against a real Prefect server: caching, crash safety, corruption,
concurrency and bad input. Each scenario starts from its own store (a copy of a reference run)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from artifacts import catalog
from artifacts.ledger import HEARTBEAT_ENV
from artifacts.store import Store
from helpers import cli_env, closing_summary, sets_for, summary_keys, write_corpus

pytestmark = pytest.mark.slow

def cli(args: list[str], env: dict, timeout: float = 300, merged: bool = False) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; `merged`: stderr into stdout, in the order written (what a terminal shows)."""
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if merged else {"capture_output": True}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, text=True, timeout=timeout, **out)


def run(store: Path, corpus: Path, env: dict, *extra: str, vocab: int = 1024, merged: bool = False) -> subprocess.CompletedProcess:
    return cli(["run", "--store", str(store), "--until", "tokenizer", *sets_for(corpus, vocab), *extra], env, merged=merged)


def ledger(store: Path, where: str = "true") -> list[tuple]:
    con = catalog.connect(Store(str(store)))
    return con.execute(f"select stage, cache_hit, status from stage_runs where {where} order by start, stage").fetchall()


def snapshot(store: Path) -> dict[str, bytes]:
    """Every committed artifact file and ref, by path: what 'the store is untouched' means."""
    out = {}
    for sub in ("artifacts", "refs"):
        for p in sorted((store / sub).rglob("*")) if (store / sub).exists() else []:
            if p.is_file() and not (sub == "refs"):
                out[str(p.relative_to(store))] = p.read_bytes()
            elif p.is_file():
                out[str(p.relative_to(store))] = json.loads(p.read_text())["key"].encode()
    return out


@pytest.fixture(scope="module")
def env(prefect_server):
    return cli_env(prefect_server)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs=12000)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, env):
    """One uninterrupted run: the keys and bytes every other scenario must reproduce."""
    store = tmp_path_factory.mktemp("ref") / "store"
    r = run(store, corpus, env)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = summary_keys(r.stdout, store)
    assert list(keys) == ["data", "tokenizer"]
    return store, keys


def fresh(reference, tmp_path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(reference[0], store)
    return store


def test_run_lists_then_is_all_cached_and_vocab_change_recomputes_only_tokenizer(reference, corpus, env, tmp_path):
    store = fresh(reference, tmp_path)
    keys = reference[1]
    ls = cli(["artifacts", "ls", "--store", str(store)], env)
    assert ls.returncode == 0
    for stage, key in keys.items():
        assert key[:12] in ls.stdout and f"{stage}/latest" in ls.stdout

    again = run(store, corpus, env, merged=True)
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("Finished in state Cached(") == 2
    assert ledger(store)[-2:] == [("data", True, "completed"), ("tokenizer", True, "completed")]
    # the run ends with its summary, after everything Prefect logs: stages, cached or computed, totals, what next
    lines = closing_summary(again.stdout)
    head = re.match(r"── chatforge run ([0-9a-f-]{36}) \(tiny\) · 2 stages: 2 cached · \d.* end to end ─+$", lines[0])
    assert head, lines[0]
    assert ledger(store, f"run_id = '{head[1]}'") == [("data", True, "completed"), ("tokenizer", True, "completed")]
    assert re.fullmatch(r"  stage\s+result\s+wall\s+cost\s+device\s+key", lines[1])
    for line, stage in zip(lines[2:4], ("data", "tokenizer")):
        assert re.fullmatch(rf"  {stage}\s+cached\s+\d+\.\d s\s+\$0\.00  cpu\s+{keys[stage][:12]}", line), line
    assert re.fullmatch(r"  total\s+\d+\.\d s\s+\$0\.00  0 device-hours", lines[4]), lines[4]
    assert "scores" not in lines and f"artifacts  {store}" in lines
    nxt = lines[lines.index("next") + 1:]
    assert re.match(rf"  chatforge artifacts show tokenizer/latest --store {re.escape(str(store))}\s+# ", nxt[0]), nxt[0]
    assert re.match(rf"  chatforge report {head[1]} --store {re.escape(str(store))}\s+# .*report card", nxt[1]), nxt[1]
    assert nxt[2].startswith(f"  chatforge artifacts query \"select stage, cache_hit, wall_seconds, cost_usd from stage_runs where run_id = '{head[1]}'\"")
    assert nxt[3].startswith("  (the same command without --until tokenizer goes on to ") and "base_eval" in nxt[3]
    assert len(nxt) == 4
    show = cli(nxt[0].split("#")[0].split()[1:], env)  # the suggested command works
    assert show.returncode == 0 and show.stdout.startswith(f"tokenizer · tokenizer · {keys['tokenizer']}"), show.stderr

    bigger = run(store, corpus, env, vocab=1100)
    assert bigger.returncode == 0, bigger.stderr[-3000:]
    assert ledger(store)[-2:] == [("data", True, "completed"), ("tokenizer", False, "completed")]
    new_keys = summary_keys(bigger.stdout, store)
    assert new_keys["data"] == keys["data"] and new_keys["tokenizer"] != keys["tokenizer"]
    assert re.search(r"^  data\s+cached\s.*\n  tokenizer\s+computed\s", bigger.stdout, re.M)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, "the run finished before the test could kill it"
        time.sleep(0.02)
    raise AssertionError("never reached the point to kill at")


@pytest.mark.parametrize("stage", ["data", "tokenizer"])
def test_kill_9_mid_stage_then_rerun_is_identical(stage, reference, corpus, env, tmp_path):
    ref_store, keys = reference
    store = tmp_path / "store"
    if stage == "tokenizer":  # start from a store that already has the dataset
        shutil.copytree(ref_store, store)
        shutil.rmtree(store / "artifacts" / keys["tokenizer"])
        (store / "refs" / "tokenizer").exists() and shutil.rmtree(store / "refs" / "tokenizer")
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--store", str(store), "--until", "tokenizer", *sets_for(corpus)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    if stage == "data":  # a shard is on disk in staging: the stage is half done
        _kill_when(proc, lambda: any((store / "tmp").glob(f"{keys['data']}.*/train_00000.parquet")))
    else:
        _kill_when(proc, lambda: f"tokenizer: computing {keys['tokenizer'][:12]}" in Path(log.name).read_text())
    assert not (store / "artifacts" / keys[stage] / "manifest.json").exists()
    assert keys[stage] not in Store(str(store)).keys()  # never listed

    r = run(store, corpus, env)
    assert r.returncode == 0, r.stderr[-3000:]
    for st in ("data", "tokenizer"):
        ours, theirs = store / "artifacts" / keys[st], ref_store / "artifacts" / keys[st]
        files = sorted(p.name for p in theirs.iterdir() if p.name != "manifest.json")
        assert files == sorted(p.name for p in ours.iterdir() if p.name != "manifest.json")
        for name in files:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), f"{st}/{name} differs after resume"


def test_flipped_byte_is_named_by_verify_and_recomputed(reference, corpus, env, tmp_path):
    store = fresh(reference, tmp_path)
    tok = store / "artifacts" / reference[1]["tokenizer"] / "tokenizer.json"
    raw = bytearray(tok.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    tok.write_bytes(bytes(raw))
    v = cli(["artifacts", "verify", "--store", str(store)], env)
    assert v.returncode == 1
    assert f"CORRUPT {reference[1]['tokenizer']}: tokenizer.json: sha256 mismatch" in v.stdout
    assert "1 ok, 1 corrupt" in v.stdout
    r = run(store, corpus, env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ledger(store)[-2:] == [("data", True, "completed"), ("tokenizer", False, "completed")]
    assert tok.read_bytes() == (reference[0] / "artifacts" / reference[1]["tokenizer"] / "tokenizer.json").read_bytes()


def test_two_identical_runs_together_compute_each_stage_once(corpus, env, tmp_path):
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--store", str(store), "--until", "tokenizer", *sets_for(corpus)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    rows = ledger(store)
    for stage in ("data", "tokenizer"):
        assert sorted(hit for s, hit, _ in rows if s == stage) == [False, True], rows


def test_show_report_prints_the_markdown_tables(reference, env):
    r = cli(["artifacts", "show", "tokenizer/latest", "--report", "--store", str(reference[0])], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("## tokenizer ") and "compression.md" in r.stdout and "| GPT-2" not in r.stderr


def test_duckdb_query_returns_the_runs_ledger_rows(reference, env):
    store, keys = reference
    con = catalog.connect(Store(str(store)))
    run_id = con.execute("select run_id from runs").fetchone()[0]
    rows = con.execute("select stage, key, cache_hit, device_type, cost_usd from stage_runs where run_id = ? order by start", [run_id]).fetchall()
    assert rows == [("data", keys["data"], False, "cpu", 0.0), ("tokenizer", keys["tokenizer"], False, "cpu", 0.0)]
    q = cli(["artifacts", "query", "--store", str(store), f"select count(*) as n from stage_runs where run_id = '{run_id}'"], env)
    assert q.returncode == 0 and "2" in q.stdout


def _bad_corpus(kind: str, tmp_path: Path) -> str:
    if kind == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        return str(tmp_path / "empty.jsonl")
    if kind == "non-utf8":
        (tmp_path / "bad.txt").write_bytes(b"good start \xff\xfe then garbage")
        return str(tmp_path / "bad.txt")
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"text": [f"document number {i} " * 20 for i in range(5000)]}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("empty", "produced no documents"),
    ("non-utf8", "not valid UTF-8"),
    ("truncated", "truncated or corrupt parquet"),
])
def test_bad_data_is_one_line_and_store_untouched(kind, message, reference, env, tmp_path):
    store = fresh(reference, tmp_path)
    before = snapshot(store)
    src = json.dumps([{"kind": "local", "paths": [_bad_corpus(kind, tmp_path)]}], separators=(",", ":"))
    r = cli(["run", "--store", str(store), "--set", f"data.sources={src}"], env)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("chatforge: error: ") and message in last, r.stderr[-2000:]
    assert snapshot(store) == before
    assert not list((store / "tmp").glob("*/*"))  # no staging left behind


@pytest.mark.parametrize("args, message", [
    (["run", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "--set", "tokenizer.vocab=5"], "unknown --set key 'tokenizer.vocab'"),
    (["run", "--set", "tokenizer.vocab_size=lots"], "bad value for tokenizer.vocab_size"),
    (["run", "--until", "grpo"], "unknown stage 'grpo'"),
    (["stage", "nonsense"], "unknown stage 'nonsense'"),
    (["run", "--store", "ftpx://host/store"], "unknown store scheme 'ftpx'"),
    (["artifacts", "show", "data/latest", "--report"], "has no markdown report"),
])
def test_bad_cli_input_is_one_line(args, message, reference, env, tmp_path):
    store = fresh(reference, tmp_path)
    before = snapshot(store)
    if "--store" not in args:
        args = [*args, "--store", str(store)]
    r = cli(args, env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"chatforge: error: {r.stderr.strip()[len('chatforge: error: '):]}"]
    assert message in r.stderr
    assert snapshot(store) == before


def test_unwritable_store_is_one_line(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    r = cli(["run", "--store", str(blocker / "store")], env)
    assert r.returncode == 1 and "is not writable" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "keep me"


def test_single_stage_rerun_resolves_inputs_from_store(reference, corpus, env, tmp_path):
    store = fresh(reference, tmp_path)
    shutil.rmtree(store / "artifacts" / reference[1]["tokenizer"])  # as if tokenizer had failed
    run_id = duckdb.connect().execute(
        f"select CAST(run_id AS VARCHAR) from read_json('{store}/runs/*.json')").fetchone()[0]
    r = cli(["stage", "tokenizer", "--run", run_id, "--store", str(store)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["tokenizer", reference[1]["tokenizer"]]
    missing = tmp_path / "empty-store"
    r = cli(["stage", "tokenizer", "--store", str(missing), *sets_for(corpus)], env)
    assert r.returncode == 1 and "is not in" in r.stderr.strip().splitlines()[-1]


def test_runs_without_any_prefect_server(reference, corpus, tmp_path):
    """No PREFECT_API_URL and no server: the CLI starts a temporary one and the cache still answers."""
    store = fresh(reference, tmp_path)
    env = {**cli_env(""), "PREFECT_HOME": str(tmp_path / "prefect")}
    r = run(store, corpus, env, merged=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "Starting temporary server" in r.stdout
    assert r.stdout.count("Finished in state Cached(") == 2
    # the temporary server is stopped before the summary, so that the summary is still the last thing printed
    assert "Stopping temporary server" in r.stdout and "Stopping temporary server" not in "\n".join(closing_summary(r.stdout))


def test_base_stage_through_the_flow_resumes_after_kill_9(reference, corpus, env, tmp_path, monkeypatch):
    """kill -9 mid-`base`: the rerun resumes from the stage's last checkpoint, not from step 0; the killed
    attempt stays in the ledger, interrupted, and its dollars are in its run's cost."""
    store = fresh(reference, tmp_path)
    core_dir, n_core = eval_dirs(tmp_path)
    # 1 s heartbeats (this process reads the ledger with the same interval), and a price for CPU time
    monkeypatch.setenv(HEARTBEAT_ENV, "1")
    env = {**env, HEARTBEAT_ENV: "1"}
    args = [sys.executable, "-m", "flows.cli", "run", "--store", str(store), *sets_for(corpus),
            "--set", "base.num_iterations=40", "--set", "base.checkpoint_every=5", "--set", "cost.prices.cpu=1.0",
            "--set", f"core_evalset.local_dir={core_dir}", "--set", f"chat_evalset.local_dir={tmp_path / 'chat'}"]
    log = open(tmp_path / "run.log", "w+")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _kill_when(proc, lambda: any((store / "wip").glob("*/step-00000010")), timeout=240)
    assert "base" not in {m.stage for m in Store(str(store)).list()}
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "base: resuming from step-000000" in r.stderr
    m = Store(str(store)).get(Store(str(store)).resolve("base/latest"))
    assert m.kind == "checkpoint" and set(m.parents) == {"data", "tokenizer"}
    assert m.metrics["steps"] == 40 and m.metrics["val_bpb"] < m.metrics["first_val_bpb"]
    assert m.metrics["resumed_from"] and m.metrics["resumed_from"][0] >= 10
    assert {"model.safetensors", "model.json", "curve.json", "samples.json"} <= set(m.files)
    assert not any((store / "wip").glob("*/step-*"))  # resume state is dropped once the artifact is committed
    rows = ledger(store, "stage = 'base'")
    assert [status for _, _, status in rows] == ["interrupted", "completed"] and rows[1][1] is False
    con = catalog.connect(Store(str(store)))
    killed, hours, cost = con.execute(
        "select run_id, device_hours, cost_usd from stage_runs where stage = 'base' and status = 'interrupted'").fetchone()
    assert hours > 0 and cost == pytest.approx(hours * 1.0)  # its time up to its last heartbeat, at $1 per CPU-hour
    run_cost, spent, interrupted = con.execute(
        "select cost_usd, (select sum(cost_usd) from stage_runs s where s.run_id = r.run_id and not cache_hit), interrupted "
        "from runs r where run_id = ?", [killed]).fetchone()
    assert interrupted == 1 and run_cost == pytest.approx(spent) and run_cost >= cost

    chat = cli(["chat", "--model", "base/latest", "--store", str(store), "-p", "Doc 1:", "--temperature", "0", "--max-tokens", "8"], env)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip() and "first token after" in chat.stderr

    # the evaluation stages ran on the same checkpoint, each named by what it covers
    st = Store(str(store))
    ev = st.get(st.resolve("base_eval/latest"))
    assert ev.kind == "eval" and ev.parents["base"] == m.key and ev.metrics["score_name"] == f"CORE-{n_core} (partial)"
    assert ev.metrics["core_tasks"] == n_core and 0 < ev.metrics["val_bpb"] < 10
    assert {"core.json", "core_table.json", "report.md", "bpb.json", "samples.json"} <= set(ev.files)
    chat_ev = st.get(st.resolve("chat_eval_base/latest"))
    assert chat_ev.metrics["score_name"] == "ChatCORE-2 (partial)" and chat_ev.metrics["chat_tasks"] == 2
    evalset = st.get(st.resolve("core_evalset/latest"))
    assert evalset.kind == "evalset" and ev.parents["core_evalset"] == evalset.key
    dec = st.get(st.resolve("decontam/latest"))
    assert dec.metrics["sets"] == n_core + 2 and "decontam.md" in dec.files
    con = catalog.connect(st)
    # the run's triple: CORE of the base model, ChatCORE of the final chat model (rl here, never chat_eval_base),
    # the chat score as the headline when there is one
    core_name, core, chat_stage, chat_name, chat_score, score_name, score = con.execute(
        "select core_name, core, chat_stage, chat_name, chat_score, score_name, score from runs "
        "where chat_stage is not null order by finished desc").fetchone()
    rl_ev = st.get(st.resolve("chat_eval_rl/latest"))
    assert (core_name, chat_stage, chat_name) == (ev.metrics["score_name"], "chat_eval_rl", rl_ev.metrics["score_name"])
    assert core == pytest.approx(ev.metrics["score"])
    assert chat_score == (None if rl_ev.metrics["score"] is None else pytest.approx(rl_ev.metrics["score"]))
    assert (score_name, score) == ((chat_name, chat_score) if chat_score is not None else (core_name, core))
    per_task = con.execute("select task, value from evals where stage = 'base_eval' and metric = 'centered' and status = 'ok'").fetchall()
    assert len(per_task) == n_core
    missing = con.execute("select count(*) from evals where stage = 'base_eval' and status = 'not run: data unavailable'").fetchone()[0]
    assert missing == 22 - n_core
    bpb = con.execute("select value from evals where suite = 'bpb' and task = 'val'").fetchone()[0]
    assert bpb == pytest.approx(ev.metrics["val_bpb"])


def eval_dirs(tmp_path: Path) -> tuple[Path, int]:
    """A CORE directory (the 18 shared tasks, else 3 hand-made ones) and a chat directory with ARC-Easy and GSM8K items."""
    from helpers import SHARED_DATA

    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "arc_easy.jsonl").write_text("".join(json.dumps(
        {"id": f"a{i}", "question": f"Pick {w}.", "choices": ["red", w, "blue", "cat"], "answer": 1, "subject": ""}) + "\n"
        for i, w in enumerate(["sun", "moon", "star"])))
    (chat / "gsm8k.jsonl").write_text(json.dumps({"question": "1 + 2?", "answer": "1 + 2 = 3\n#### 3"}) + "\n")
    if (SHARED_DATA / "eval" / "core").is_dir():
        return SHARED_DATA / "eval" / "core", 18
    core = tmp_path / "core"
    core.mkdir()
    (core / "copa.jsonl").write_text(json.dumps({"query": "The man fell", "choices": ["because he slipped", "so he ate"], "gold": 0}) + "\n"
                                     + json.dumps({"query": "It rained", "choices": ["so we got wet", "so we got dry"], "gold": 0}) + "\n")
    (core / "lambada_openai.jsonl").write_text(json.dumps({"context": "One two three", "continuation": "four"}) + "\n")
    (core / "winograd_wsc.jsonl").write_text(json.dumps({"context_options": ["A ran", "B ran"], "continuation": "fast", "gold": 0}) + "\n")
    return core, 3
