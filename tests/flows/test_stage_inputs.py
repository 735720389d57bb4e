"""`chatforge stage NAME --input INPUT=REF`: a single-stage run that reads one of its inputs from a given artifact
(an imported checkpoint, an earlier run's) instead of the one its config plans. The key plan derives from the given
key; a wrong name, an unknown ref or an artifact of the wrong kind is one line and changes nothing; and a real run
reads the given artifact and names it among its manifest's parents."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.keys import artifact_key, code_fingerprint, file_sha256
from artifacts.manifest import Manifest
from artifacts.store import Store
from flows.overrides import build_config
from helpers import cli_env
from model.errors import InputError
from tasks import inputs
from tasks.registry import STAGES, get
from tasks.runner import execute
from tasks.stage import plan

ROOT = Path(__file__).resolve().parents[2]
IMPORTED = "import/test--tiny"  # the ref `chatforge import hf://test/tiny` gives the checkpoint


def cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI, stderr into stdout in the order written: what a terminal shows."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, text=True, timeout=timeout, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def tree(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def commit_dir(store: Store, src: Path, kind: str, stage: str, ref: str) -> str:
    """`src`'s files as a committed artifact under a content-derived key (as an import makes one), with `ref`."""
    content = {str(p.relative_to(src)): file_sha256(p) for p in sorted(src.rglob("*")) if p.is_file()}
    key = artifact_key("test-import", {"kind": kind, "files": content}, {}, "")
    with store.staging(key) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        store.commit(tmp, Manifest(key=key, kind=kind, stage=stage, config={"source": "test"}, parents={}, code={}))
    store.set_ref(ref, key)
    return key


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, tiny_checkpoint) -> Path:
    """A store holding the tiny base checkpoint under IMPORTED, a checkpoint whose model.json says sft
    (`import/test--sft`), and a tokenizer artifact (`tokenizer/test`)."""
    root = tmp_path_factory.mktemp("stage-inputs") / "store"
    st = Store(str(root))
    commit_dir(st, tiny_checkpoint, "checkpoint", "import", IMPORTED)
    sft = root.parent / "sft-src"
    shutil.copytree(tiny_checkpoint, sft)
    meta = json.loads((sft / "model.json").read_text())
    (sft / "model.json").write_text(json.dumps({**meta, "stage": "sft"}))
    commit_dir(st, sft, "checkpoint", "import", "import/test--sft")
    commit_dir(st, tiny_checkpoint / "tokenizer", "tokenizer", "tokenizer", "tokenizer/test")
    return root


# ---------------------------------------------------------------- planning

def test_a_given_input_changes_the_key_of_its_stage_and_of_everything_after_it():
    cfg = build_config("tiny")
    planned = plan(STAGES, cfg)
    assert plan(STAGES, cfg, {}) == plan(STAGES, cfg, None) == planned
    given = "ab" * 32
    keys = plan(STAGES, cfg, {"base": given})
    assert keys["base"] == given
    changed = {s.name for s in STAGES if keys[s.name] != planned[s.name]}
    assert changed == {"base", "base_eval", "chat_eval_base", "mid", "chat_eval_mid", "sft", "chat_eval_sft", "rl",
                       "chat_eval_rl", "report"}
    # the stage's key is the one its inputs' keys make: the given one in place of the planned one
    mid = get("mid")
    assert keys["mid"] == artifact_key("mid", cfg.mid.key_dict(), {"base": given, "mid_data": planned["mid_data"]},
                                       code_fingerprint(mid.code))
    assert keys["mid"] == mid.key(cfg, {"base": given, "mid_data": planned["mid_data"]})
    # an eval of a given sft checkpoint: its own key moves, nothing before it does
    keys = plan(STAGES, cfg, {"sft": given})
    assert keys["chat_eval_sft"] == get("chat_eval_sft").key(cfg, {"sft": given, "chat_evalset": planned["chat_evalset"]})
    assert {s.name for s in STAGES if keys[s.name] != planned[s.name]} == {
        "sft", "chat_eval_sft", "rl", "chat_eval_rl", "report"}


def test_given_inputs_resolve_by_ref_key_and_prefix(store_root):
    st = Store(str(store_root))
    key = st.resolve(IMPORTED)
    for ref in (IMPORTED, key, key[:10]):
        assert inputs.resolve(get("mid"), {"base": ref}, st) == {"base": key}
        assert inputs.resolve(get("chat_eval_base"), {"base": ref}, st) == {"base": key}
    # an eval takes any checkpoint; a training stage only its parent stage's (model/train/common.py load_start)
    sft = st.resolve("import/test--sft")
    assert inputs.resolve(get("chat_eval_base"), {"base": sft}, st) == {"base": sft}
    assert inputs.resolve(get("rl"), {"sft": "import/test--sft"}, st) == {"sft": sft}
    assert inputs.parse(["base=base/latest", "chat_evalset = abcdef12"]) == {"base": "base/latest", "chat_evalset": "abcdef12"}


@pytest.mark.parametrize("stage, given, message", [
    ("mid", {"tokenizer": IMPORTED}, "stage 'mid' has no input 'tokenizer': its inputs are base, mid_data"),
    ("mid", {"base": "base/nope"}, "input base=base/nope of stage mid: unknown ref 'base/nope' in "),
    ("mid", {"base": "0123456789ab"}, "input base=0123456789ab of stage mid: no artifact with key prefix '0123456789ab'"),
    ("mid", {"base": "tokenizer/test"}, "is a tokenizer artifact (made by tokenizer), but base takes a checkpoint: pass a checkpoint artifact"),
    ("chat_eval_sft", {"chat_evalset": IMPORTED}, "is a checkpoint artifact (made by import), but chat_evalset takes an evalset"),
    ("mid", {"base": "import/test--sft"}, "mid starts from a base checkpoint, but "),
    ("rl", {"sft": IMPORTED}, "rl starts from a sft checkpoint, but "),
])
def test_a_bad_given_input_is_one_line(store_root, stage, given, message):
    st = Store(str(store_root))
    with pytest.raises(Exception) as e:
        inputs.resolve(get(stage), given, st)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_malformed_input_options_are_refused():
    for pairs, message in ((["base"], "write it as NAME=REF"), (["=x"], "write it as NAME=REF"),
                           (["base=a", "base=b"], "given twice")):
        with pytest.raises(InputError, match=message):
            inputs.parse(pairs)


def test_the_flow_checks_its_inputs_parameter_before_recording_anything(store_root):
    """The UI passes `inputs` straight to the stage flow: the same checks, before the run is recorded."""
    from flows.pipeline import stage_flow

    before = tree(store_root)
    with pytest.raises(InputError, match="stage 'mid' has no input 'sft'"):
        stage_flow.fn(stage="mid", config=build_config("tiny"), store=str(store_root), inputs={"sft": IMPORTED})
    with pytest.raises(InputError, match="but base takes a checkpoint"):
        stage_flow.fn(stage="mid", config=build_config("tiny"), store=str(store_root), inputs={"base": "tokenizer/test"})
    assert tree(store_root) == before


def test_the_run_name_says_what_stands_in_for_which_input(monkeypatch):
    import prefect.runtime.flow_run as fr

    from flows import ui

    cfg = build_config("tiny")
    given = "cd" * 32
    key = plan(STAGES, cfg, {"base": given})["mid"][:12]
    params = {"stage": "mid", "config": ui.form_config(cfg), "inputs": {"base": given}}
    monkeypatch.setitem(fr.FIELDS, "parameters", lambda: params)
    assert ui.stage_run_name() == f"tiny: mid {key} from base={given[:12]}"
    params["inputs"] = {"base": "import/org--repo"}  # a ref from the UI: resolved by the run, not by its name
    assert ui.stage_run_name() == "tiny: mid from base=import/org--repo"
    params["inputs"] = {}
    assert ui.stage_run_name() == f"tiny: mid {plan(STAGES, cfg)['mid'][:12]}"


# ---------------------------------------------------------------- through the CLI

CLI_CASES = [
    (["mid", "--input", f"tokenizer={IMPORTED}"], "stage 'mid' has no input 'tokenizer': its inputs are base, mid_data"),
    (["nope", "--input", f"base={IMPORTED}"], "unknown stage 'nope'"),
    (["mid", "--input", "base"], "bad --input 'base': write it as NAME=REF"),
    (["mid", "--input", "base=base/nope"], "input base=base/nope of stage mid: unknown ref 'base/nope'"),
    (["chat_eval_base", "--input", "base=tokenizer/test"], "tokenizer artifact (made by tokenizer), but base takes a checkpoint"),
    (["mid", "--input", "base=import/test--sft"], "is a checkpoint of sft (its model.json): pass a base checkpoint"),
]


def test_bad_input_options_are_one_line_and_change_nothing(store_root, tmp_path):
    before = tree(store_root)
    # no Prefect server at all: a case that got past the checks would fail differently, not start one
    env = {**cli_env("http://127.0.0.1:9/api"), "PREFECT_HOME": str(tmp_path / "prefect")}
    for args, message in CLI_CASES:
        r = cli(["stage", *args, "--store", str(store_root)], env, timeout=120)
        lines = [line for line in r.stdout.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("chatforge: error: "), (args, r.stdout[-3000:])
        assert message in lines[0], (args, lines[0])
        assert tree(store_root) == before and not (tmp_path / "prefect").exists()
    r = cli(["stage", "mid", "--input", "base=x", "--store", str(tmp_path / "none")], env, timeout=120)
    assert r.returncode == 1 and not (tmp_path / "none").exists()


def test_stage_help_documents_input():
    r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "--input NAME=REF" in r.stdout and "hf://org/repo" in r.stdout


# ---------------------------------------------------------------- a real run from a given checkpoint

@pytest.mark.slow
def test_chat_eval_of_a_given_checkpoint(store_root, prefect_server, tmp_path):
    """`chatforge stage chat_eval_base --input base=import/test--tiny`: the eval runs on that checkpoint (the config
    plans a base checkpoint the store does not have), and its manifest names it as its parent."""
    store = tmp_path / "store"
    shutil.copytree(store_root, store)
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "arc_easy.jsonl").write_text("".join(json.dumps(
        {"id": f"a{i}", "question": f"Pick {w}.", "choices": ["red", w, "blue", "cat"], "answer": 1, "subject": ""}) + "\n"
        for i, w in enumerate(["sun", "moon"])))
    sets = [f"chat_evalset.local_dir={chat}", "chat_evalset.source=none", "chat_evalset.spellingbee_items=0",
            "chat_eval.max_per_task=1", "chat_eval.max_new_tokens=4", "chat_eval.device=cpu"]
    cfg = build_config("tiny", sets)
    st = Store(str(store))
    planned = plan(STAGES, cfg)
    execute(get("chat_evalset"), cfg, st, planned, "setup", log=lambda m: None)  # the other input, as a run leaves it
    assert st.manifest(planned["base"]) is None
    given = st.resolve(IMPORTED)

    r = cli(["stage", "chat_eval_base", "--store", str(store), *[a for s in sets for a in ("--set", s)],
             "--input", f"base={IMPORTED}"], cli_env(prefect_server))
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"chatforge: chat_eval_base reads base from {IMPORTED} ({given[:12]})" in r.stdout
    want = plan(STAGES, cfg, {"base": given})["chat_eval_base"]
    assert f"tiny: chat_eval_base {want[:12]} from base={given[:12]}" in r.stdout  # the flow run's name
    assert want == get("chat_eval_base").key(cfg, {"base": given, "chat_evalset": planned["chat_evalset"]})
    assert r.stdout.strip().splitlines()[-1].split() == ["chat_eval_base", want]
    m = st.get(want)
    assert m.kind == "eval" and m.parents == {"base": given, "chat_evalset": planned["chat_evalset"]}
    assert m.metrics["chat_tasks"] == 1 and st.resolve("chat_eval_base/latest") == want
    # the same again is a cache hit on the same key
    r = cli(["stage", "chat_eval_base", "--store", str(store), *[a for s in sets for a in ("--set", s)],
             "--input", f"base={given[:12]}"], cli_env(prefect_server))
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].split() == ["chat_eval_base", want], r.stdout[-3000:]
    assert "Finished in state Cached(" in r.stdout
