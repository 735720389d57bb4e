"""Conversation mixtures: the artifact's layout, seeded draws, oversampling, decontamination against the
evalset artifacts, bad input (one line, nothing written), and the three stage definitions."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from model.config import ChatEvalsetConfig, CoreEvalsetConfig, MixtureConfig, MixtureEntry
from model.data import chat_sources as cs
from model.data import mixture, synthetic
from model.errors import InputError
from model.evals import evalsets
from model.evals.chat_tasks import render_mc, spellingbee_items

from test_chat_sources import hub  # noqa: F401  (the fake Hub fixture)

MMLU_ITEM = {"id": "m1", "question": "Which planet in our solar system is known as the red planet?",
             "choices": ["Venus", "Mars", "Jupiter", "Saturn"], "answer": 1, "subject": "astronomy"}
GSM_ITEM = {"id": "g1", "question": "A baker makes 24 muffins every morning and sells them in boxes of 6. How many "
                                    "boxes does the baker fill in one week of mornings?",
            "solution": "24/6 = <<24/6=4>>4 boxes a day. 4*7 = <<4*7=28>>28 boxes.\n#### 28", "answer": "28"}
WORDS = ["strawberry", "banana", "apple", "mississippi"]


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def evalset_dirs(tmp_path_factory) -> dict[str, Path]:
    """Small chat and CORE evalset artifacts, built by the evalset stages' own code from local files."""
    root = tmp_path_factory.mktemp("evals")
    src = root / "src"
    (src / "core").mkdir(parents=True)
    (src / "mmlu.jsonl").write_text(json.dumps(MMLU_ITEM) + "\n")
    (src / "gsm8k.jsonl").write_text(json.dumps(GSM_ITEM) + "\n")
    bee = [{"id": f"b{i}", "word": w, "letter": "a", "answer": w.count("a"),
            "question": f"How many times does the letter 'a' appear in the word '{w}'?"} for i, w in enumerate(WORDS)]
    (src / "spellingbee.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bee))
    (src / "core" / "copa.jsonl").write_text(json.dumps(
        {"query": "The man turned on the faucet and filled the kitchen sink with warm soapy water because",
         "choices": ["he wanted to wash the dishes", "he was thirsty"], "gold": 0}) + "\n")
    chat, core = root / "chat", root / "core"
    evalsets.build_chat(ChatEvalsetConfig(source="none", local_dir=str(src), spellingbee_items=0), chat, root / "dl", log=quiet)
    evalsets.build_core(CoreEvalsetConfig(url=None, local_dir=str(src / "core")), core, root / "dl", log=quiet)
    return {"core_evalset": core, "chat_evalset": chat}


def write_jsonl(path: Path, convs: list) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    return path


def conv(q: str, a) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def build(cfg: MixtureConfig, tmp_path: Path, evalset_dirs: dict, name: str = "out") -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    return out, mixture.build(cfg, out, tmp_path / "dl", evalset_dirs, stage="sft_data", log=quiet)


def both(source: str, count_train=None, count_val=None, **kw) -> dict:
    return {"train": [MixtureEntry(source=source, count=count_train, **kw)],
            "val": [MixtureEntry(source=source, split="val", count=count_val, **kw)]}


# ---------------------------------------------------------------- layout and draws

def test_artifact_layout_and_reader(tmp_path, evalset_dirs):
    cfg = MixtureConfig(train=[MixtureEntry(source="arithmetic", count=50), MixtureEntry(source="identity")],
                        val=[MixtureEntry(source="arithmetic", split="val", count=5)])
    out, metrics = build(cfg, tmp_path, evalset_dirs)
    assert sorted(p.name for p in out.iterdir()) == ["mixture.json", "train.parquet", "val.parquet"]
    table = pq.read_table(out / "train.parquet")
    assert [(f.name, str(f.type)) for f in table.schema] == [("messages", "string"), ("source", "string"), ("answer", "string")]
    train = mixture.load_conversations(out, "train")
    n_identity = sum(1 for c in synthetic.identity() if cs.split_of(c["messages"]) == "train")
    assert len(train) == 50 + n_identity == metrics["conversations"]["train"]
    assert {c["source"] for c in train} == {"arithmetic", "identity"}
    order = [c["source"] for c in train]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # one shuffle of the whole split
    for c in train:
        cs.check(c["messages"])
        assert (c["answer"] is None) == (c["source"] == "identity")
    val = mixture.load_conversations(out, "val")
    assert len(val) == 5 and all(cs.split_of(c["messages"]) == "val" for c in val)
    assert not {json.dumps(c["messages"]) for c in val} & {json.dumps(c["messages"]) for c in train}
    meta = json.loads((out / "mixture.json").read_text())
    assert meta["entries"]["train"][0] == {"source": "arithmetic", "requested": 50, "taken": 50, "kept": 50}
    assert meta["entries"]["train"][1]["requested"] is None and meta["entries"]["train"][1]["available"] == n_identity
    assert meta["sources"]["arithmetic"]["provenance"][0]["origin"].startswith("synthetic (chatforge")
    assert meta["sources"]["arithmetic"]["provenance"][0]["seed"] == cs.derive_seed(42, "arithmetic")
    assert meta["sources"]["identity"]["licence"].startswith("chatforge")
    assert metrics["by_source"]["train"] == {"arithmetic": 50, "identity": n_identity}
    assert metrics["decontamination"]["checked"] == len(train) + len(val) and metrics["decontamination"]["dropped"] == 0
    assert metrics["decontamination"]["sets"] == 4  # chat: gsm8k, mmlu, spellingbee; core: copa
    json.dumps(metrics)
    with pytest.raises(InputError, match="unknown split"):
        mixture.load_conversations(out, "test")


def test_same_config_same_bytes_and_the_seed_changes_the_draw(tmp_path, evalset_dirs):
    cfg = MixtureConfig(train=[MixtureEntry(source="arithmetic", count=40), MixtureEntry(source="identity", count=10)])
    a, _ = build(cfg, tmp_path, evalset_dirs, "a")
    b, _ = build(cfg, tmp_path, evalset_dirs, "b")
    for name in ("train.parquet", "val.parquet", "mixture.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    c, _ = build(cfg.model_copy(update={"seed": 7}), tmp_path, evalset_dirs, "c")
    assert mixture.load_conversations(c, "train") != mixture.load_conversations(a, "train")
    assert len(mixture.load_conversations(c, "val")) == 0  # no val entries: an empty val split


def test_listing_a_source_twice_takes_the_same_rows_again(tmp_path, evalset_dirs):
    once, _ = build(MixtureConfig(train=[MixtureEntry(source="identity", count=8)]), tmp_path, evalset_dirs, "once")
    twice, m = build(MixtureConfig(train=[MixtureEntry(source="identity", count=8), MixtureEntry(source="identity", count=8),
                                          MixtureEntry(source="arithmetic", count=3)]), tmp_path, evalset_dirs, "twice")
    key = lambda c: json.dumps(c["messages"], sort_keys=True)  # noqa: E731
    first = sorted(map(key, mixture.load_conversations(once, "train")))
    got = sorted(key(c) for c in mixture.load_conversations(twice, "train") if c["source"] == "identity")
    assert got == sorted(first * 2) and m["by_source"]["train"] == {"arithmetic": 3, "identity": 16}


def test_count_beyond_a_finite_source_takes_all_of_it(tmp_path, evalset_dirs):
    messages: list[str] = []
    out = tmp_path / "out"
    out.mkdir()
    m = mixture.build(MixtureConfig(train=[MixtureEntry(source="identity", count=10_000)]), out, tmp_path / "dl",
                      evalset_dirs, log=messages.append)
    assert any("asked for 10000" in line for line in messages)
    entry = json.loads((out / "mixture.json").read_text())["entries"]["train"][0]
    assert m["conversations"]["train"] == entry["available"] == entry["taken"] < 10_000


def test_nanochat_default_mixtures_on_the_hubs_layout(tmp_path, evalset_dirs, hub):
    """The real presets' mixtures (nanochat v0), on local files in the Hub's layout."""
    from model.config import nanochat_mid_data, nanochat_rl_data, nanochat_sft_data

    for name, cfg in (("mid", nanochat_mid_data()), ("sft", nanochat_sft_data()), ("rl", nanochat_rl_data())):
        out, m = build(cfg.model_copy(update={"hub_revision": "r1"}), tmp_path, evalset_dirs, name)
        train, val = mixture.load_conversations(out, "train"), mixture.load_conversations(out, "val")
        assert len(train) == m["conversations"]["train"] > 0 and len(val) == m["conversations"]["val"]
        assert set(m["by_source"]["train"]) == {e.source for e in cfg.train}
        meta = json.loads((out / "mixture.json").read_text())
        for source in m["by_source"]["train"]:
            prov = meta["sources"][source]["provenance"][0]
            assert prov["origin"].startswith("hf://datasets/") and prov["revision"] == "r1" and prov["files"]
    assert m["by_source"] == {"train": {"gsm8k": m["by_source"]["train"]["gsm8k"]}, "val": {"gsm8k": m["by_source"]["val"]["gsm8k"]}}
    assert all(r["answer"] for r in train + val)  # RL problems all have a checkable answer
    assert not any("test-" in f and repo != "HuggingFaceTB/smol-smoltalk" for repo, f, _ in hub)  # no eval split read


# ---------------------------------------------------------------- decontamination

def test_planted_eval_items_are_dropped_and_counted(tmp_path, evalset_dirs):
    planted = [
        # MMLU's test question rendered exactly as chat_eval asks it: a 12-word question, so only the
        # question + choices (as eval items read) hold a 13-gram
        conv(render_mc(MMLU_ITEM["question"], MMLU_ITEM["choices"]), "B"),
        conv(f"Please solve: {GSM_ITEM['question']}", "It is 28.\n#### 28"),  # GSM8K test, inside other text
        conv("How many times does the letter 'a' appear in the word 'banana'?", "3"),  # SpellingBee item
    ]
    clean = [conv(f"Tell me a fact about the number {i}.", f"{i} is a number.") for i in range(60)]
    path = write_jsonl(tmp_path / "mine.jsonl", clean[:30] + planted + clean[30:])
    cfg = MixtureConfig(**both("local", paths=[str(path)]))
    out, m = build(cfg, tmp_path, evalset_dirs)
    rows = mixture.load_conversations(out, "train") + mixture.load_conversations(out, "val")
    assert len(rows) == 60 and all(r["messages"] in clean for r in rows)
    d = m["decontamination"]
    assert d["checked"] == 63 and d["dropped"] == 3 and d["dropped_by_source"] == {"local": 3}
    assert d["dropped_by_set"] == {"chat_evalset/gsm8k": 1, "chat_evalset/mmlu": 1, "chat_evalset/spellingbee": 1}
    meta = json.loads((out / "mixture.json").read_text())
    sets = meta["decontamination"]["eval_sets"]
    assert sets["chat_evalset/mmlu"]["contaminated_items"] == 1 and sets["core_evalset/copa"]["conversations_dropped"] == 0
    assert sum(e.get("contaminated", 0) for s in meta["entries"].values() for e in s) == 3
    assert {e["source"] for e in meta["decontamination"]["examples"]} == {"local"}


def test_mc_text_is_scanned_as_eval_items_read():
    texts = mixture.scan_texts(conv(render_mc("Q?", ["one", "two"]), "A"))
    assert texts[1] == "Q?\n\none\ntwo\n" and len(texts) == 2
    assert mixture.scan_texts(conv("plain", "text")) == ["plain\ntext"]


def test_spellingbee_training_data_avoids_the_eval_pairs(tmp_path, evalset_dirs, monkeypatch):
    monkeypatch.setattr(evalsets, "spelling_words", lambda download_dir: WORDS)
    out, m = build(MixtureConfig(train=[MixtureEntry(source="spellingbee", count=60)]), tmp_path, evalset_dirs)
    rows = mixture.load_conversations(out, "train")
    assert len(rows) == 60 and m["decontamination"]["dropped"] == 0
    pair_of = {it["question"]: (it["word"], it["letter"])
               for it in spellingbee_items(WORDS, 4096, cs.derive_seed(42, "spellingbee"))}
    made = {pair_of[r["messages"][0]["content"]] for r in rows}
    assert made and not made & {(w, "a") for w in WORDS}  # the eval's pairs
    meta = json.loads((out / "mixture.json").read_text())
    assert meta["sources"]["spellingbee"]["provenance"][0]["excluded_eval_pairs"] == len(WORDS)


# ---------------------------------------------------------------- bad input: one line, nothing written

@pytest.mark.parametrize("cfg, needle", [
    (MixtureConfig(train=[MixtureEntry(source="arithmetic")]), "give it a count"),
    (MixtureConfig(train=[MixtureEntry(source="identity")], val=[MixtureEntry(source="sharegpt", count=5)]),
     "listed under val"),
    (MixtureConfig(train=[MixtureEntry(source="local")]), "needs paths"),
    (MixtureConfig(train=[MixtureEntry(source="identity", paths=["x.jsonl"])]), "only local entries"),
    (MixtureConfig(train=[MixtureEntry(source="local", paths=["/nonexistent/*.jsonl"])]), "matches no file"),
])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, evalset_dirs, cfg, needle):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as e:
        mixture.build(cfg, out, tmp_path / "dl", evalset_dirs, stage="mid_data", log=quiet)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert list(out.iterdir()) == []


def test_invalid_local_conversation_names_file_line_and_writes_nothing(tmp_path, evalset_dirs):
    path = write_jsonl(tmp_path / "convs.jsonl", [conv("fine", "ok"), conv("two", "ok"),
                                                 [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                                                  {"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]])
    out = tmp_path / "out"
    out.mkdir()
    cfg = MixtureConfig(train=[MixtureEntry(source="arithmetic", count=5), MixtureEntry(source="local", paths=[str(path)])])
    with pytest.raises(InputError, match=rf"{path}:3 is not a valid conversation: message 1 is a system message") as e:
        mixture.build(cfg, out, tmp_path / "dl", evalset_dirs, log=quiet)
    assert "\n" not in str(e.value) and list(out.iterdir()) == []
    write_jsonl(path, [conv("fine", [])])
    with pytest.raises(InputError, match=rf"{path}:1 .*empty assistant turn"):
        mixture.build(cfg, out, tmp_path / "dl", evalset_dirs, log=quiet)
    assert list(out.iterdir()) == []


def test_everything_contaminated_is_an_error(tmp_path, evalset_dirs):
    path = write_jsonl(tmp_path / "bad.jsonl", [conv(GSM_ITEM["question"], "28")])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="no training conversations left"):
        mixture.build(MixtureConfig(**both("local", paths=[str(path)])), out, tmp_path / "dl", evalset_dirs, log=quiet)
    assert list(out.iterdir()) == []


def test_unknown_source_is_a_one_line_cli_error():
    from flows.overrides import ConfigError, build_config

    for sets in (['sft_data.train=[{"source": "reddit"}]'], ["rl_data.train.0.source=reddit"]):
        with pytest.raises(ConfigError) as e:
            build_config("tiny", sets)
        assert "reddit" in str(e.value) and "smoltalk" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- the stage definitions

def test_stage_defs_and_local_file_content_in_the_key(tmp_path):
    from model.config import DataConfig, LocalSource, PipelineConfig
    from tasks.mixtures import MID_DATA, RL_DATA, SFT_DATA

    for st, name in ((MID_DATA, "mid_data"), (SFT_DATA, "sft_data"), (RL_DATA, "rl_data")):
        assert (st.name, st.kind, st.section, st.inputs) == (name, "conversations", name, ("core_evalset", "chat_evalset"))
        assert "model.data.mixture" in st.code and "model.data.chat_sources" in st.code
    a = tmp_path / "a"
    a.mkdir()
    write_jsonl(a / "c.jsonl", [conv("q", "a")])

    def key(path: Path) -> str:
        cfg = PipelineConfig(data=DataConfig(sources=[LocalSource(paths=["x"])]))
        cfg.sft_data = MixtureConfig(train=[MixtureEntry(source="local", paths=[str(path / "c.jsonl")])])
        return SFT_DATA.key(cfg, {"core_evalset": "k1", "chat_evalset": "k2"})

    assert key(a) == key(a)
    first = key(a)
    write_jsonl(a / "c.jsonl", [conv("q", "changed")])
    assert key(a) != first
    write_jsonl(a / "c.jsonl", [conv("q", "a")])
    assert key(a) == first
