"""13-gram decontamination: what counts as a hit, per-set reports, and item text extraction."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from model.data.decontam import EvalIndex, check, item_text, markdown, ngrams

COPA = Path(__file__).resolve().parents[4] / "shared" / "data" / "eval" / "core" / "copa.jsonl"

ITEM = ("The quick brown fox jumps over the lazy dog while seven purple elephants "
        "quietly debate the merits of cold soup")  # 20 words
FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"


def _filler_words(k: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = FILLER.split() + ["alpha", "beta", "gamma", "delta", "the", "of", "and"]
    return " ".join(rng.choice(vocab) for _ in range(k))


def test_ngrams_are_stable_and_normalized():
    assert len(ngrams(ITEM)) == 20 - 13 + 1
    assert ngrams(ITEM) == ngrams("  THE quick,brown fox... jumps over the LAZY dog; while seven purple "
                                  "elephants\nquietly debate the merits of cold\tsoup!")
    assert ngrams("only a few words here") == set()
    # NFKC folds compatibility forms: fullwidth letters read as plain ones.
    assert ngrams("ｆｕｌｌ width", n=2) == ngrams("full width", n=2)
    # a fixed value pins the hash definition, so reports stay comparable across processes and versions
    assert ngrams("A, b", n=2) == {17600707320206839748}
    assert ngrams("a b c", n=2) == {17600707320206839748, 18286342832848802827}


def test_verbatim_copy_amid_other_text_is_found():
    doc = (_filler_words(200) + " — and then: " + ITEM.upper().replace(" ", "  \n ").replace("fox", "fox,")
           + "!! " + _filler_words(200, seed=1))
    report = check([_filler_words(300, seed=2), doc], {"s": ["unrelated item " + FILLER * 2, ITEM]})
    assert report["s"]["contaminated"] == 1
    assert report["s"]["examples"] == [1]
    assert report["s"]["fraction"] == 0.5


def test_twelve_shared_words_are_not_a_hit():
    twelve = " ".join(ITEM.split()[:12])
    report = check([_filler_words(50) + " " + twelve + " " + _filler_words(50, seed=3)], {"s": [ITEM]})
    assert report["s"]["contaminated"] == 0
    thirteen = " ".join(ITEM.split()[3:16])
    assert check([f"x y {thirteen} z"], {"s": [ITEM]})["s"]["contaminated"] == 1


def test_reports_per_set_with_right_examples():
    items = [f"item number {i} " + _filler_words(20, seed=100 + i) for i in range(12)]
    sets = {"a": items[:6], "b": items[6:]}
    planted = [items[1], items[4], items[7], items[8], items[9], items[10], items[11]]
    report = check([_filler_words(30, seed=5) + " " + t for t in planted], sets)
    assert report["a"] == {"items": 6, "checked": 6, "too_short": 0, "contaminated": 2,
                           "fraction": 2 / 6, "examples": [1, 4]}
    # set b has 5 hits; examples are capped at five, in index order
    assert report["b"]["contaminated"] == 5 and report["b"]["examples"] == [1, 2, 3, 4, 5]


def test_short_items_whole_sequence_or_too_short():
    ten = "which planet in our solar system has the most moons"  # 10 words: checked as one gram
    tiny = "what is two plus two"  # 5 words: cannot be checked
    sets = {"s": [ten, tiny, ITEM]}
    index = EvalIndex(sets)
    index.scan("Quiz time. Which planet in our Solar System has the MOST moons? Saturn.")
    index.scan("what is two plus two")
    r = index.report()["s"]
    assert (r["items"], r["checked"], r["too_short"], r["contaminated"], r["examples"]) == (3, 2, 1, 1, [0])
    # a partial copy of a short item (its first 8 words) is not a hit
    assert check(["which planet in our solar system has the"], sets)["s"]["contaminated"] == 0
    # min_words is configurable
    assert check([tiny], sets, min_words=5)["s"] == {"items": 3, "checked": 3, "too_short": 0,
                                                     "contaminated": 1, "fraction": 1 / 3, "examples": [1]}


def test_grams_do_not_span_documents():
    ws = ITEM.split()
    stream = [_filler_words(40) + " " + " ".join(ws[:10]), " ".join(ws[10:]) + " " + _filler_words(40, seed=9)]
    assert check(stream, {"s": [ITEM]})["s"]["contaminated"] == 0
    assert check([" ".join(stream)], {"s": [ITEM]})["s"]["contaminated"] == 1


def test_shared_gram_counts_for_every_owner():
    # three items own the same grams, one of them twice over (its text repeats the passage)
    sets = {"a": [ITEM, "unrelated " + FILLER], "b": ["something else entirely", f"{ITEM} and again {ITEM}"],
            "c": ["prefix words " + ITEM]}
    report = check([ITEM], sets)
    assert [report[s]["examples"] for s in "abc"] == [[0], [1], [0]]


def test_item_text_covers_each_shape():
    shapes = [
        ({"query": "Q1?", "choices": ["c1", "c2"], "gold": 1}, "Q1?\nc1\nc2"),
        ({"context_options": ["o1", "o2"], "continuation": "k", "gold": 0}, "o1\no2\nk"),
        ({"context": "ctx", "continuation": "cont", "category": "world_history"}, "ctx\ncont"),
        ({"question": "mmlu q", "choices": ["a1", "a2"], "answer": 2, "subject": "law"}, "mmlu q\na1\na2"),
        ({"question": "gsm q", "solution": "step one", "answer": "18"}, "gsm q\nstep one"),
        ({"context": "gsm ctx", "chain_of_thought": "cot", "answer": "3"}, "gsm ctx\ncot"),
        ({"question": "hf gsm", "answer": "work it out #### 18"}, "hf gsm\nwork it out #### 18"),
        ({"task_id": "HumanEval/0", "prompt": "def f():", "canonical_solution": "  return 1",
          "test": "assert f() == 1", "entry_point": "f"}, "def f():\n  return 1"),
        ({"word": "strawberry", "letter": "r", "count": 3, "question": "How many r in strawberry?"},
         "How many r in strawberry?"),
    ]
    for item, want in shapes:
        assert item_text(item) == want, item


def test_markdown_table():
    report = check([ITEM], {"copa": [ITEM, "no match here at all but long enough to check"], "tiny": ["hi"]})
    md = markdown(report, 13)
    assert "13-gram" in md
    assert "| set | items | checked | contaminated | fraction |" in md
    assert "| copa | 2 | 2 | 1 | 50.00% |" in md
    assert "| tiny | 1 | 0 | 0 | 0.00% |" in md


@pytest.mark.skipif(not COPA.exists(), reason=f"{COPA} is absent (a fresh clone has no ../shared)")
def test_real_copa_items_planted_are_found_exactly():
    items = [json.loads(line) for line in COPA.read_text().splitlines() if line.strip()]
    texts = [item_text(it) for it in items]
    rng = random.Random(0)
    planted = sorted(rng.sample(range(len(texts)), 3))
    docs = [_filler_words(300, seed=s) for s in range(30)]
    clean = check(docs, {"copa": texts})["copa"]
    assert clean["contaminated"] == 0 and clean["checked"] == len(texts)
    for j, i in enumerate(planted):
        docs[5 + 7 * j] += "\n\nQ: " + texts[i].replace("\n", " ") + "\n" + _filler_words(20, seed=j)
    report = check(docs, {"copa": texts})["copa"]
    assert report["contaminated"] == 3 and report["examples"] == planted


def test_stage_run_reports_planted_items_per_evalset(tmp_path):
    """The decontam stage's entry point: dataset artifact (train split) × evalset artifacts → report files."""
    from model.config import ChatEvalsetConfig, DataConfig, LocalSource
    from model.data.dataset import build
    from model.evals.evalsets import build_chat, load_sets

    rng = random.Random(5)
    vocab = [f"w{k}" for k in range(500)]
    gsm = [{"id": f"g{i}", "question": " ".join(rng.choice(vocab) for _ in range(20)) + "?", "solution": f"{i} + 3\n#### {i + 3}",
            "answer": str(i + 3)} for i in range(6)]
    src = tmp_path / "evals"
    src.mkdir()
    (src / "gsm8k.jsonl").write_text("".join(json.dumps(it) + "\n" for it in gsm))
    build_chat(ChatEvalsetConfig(source="none", local_dir=str(src), spellingbee_items=0), tmp_path / "chat", tmp_path / "dl",
               log=lambda m: None)
    docs = [{"text": f"Filler document {i} about rivers, hills and the weather in spring."} for i in range(200)]
    docs[17]["text"] += " " + gsm[4]["question"].upper()  # planted, in another case
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "data").mkdir()
    build(DataConfig(sources=[LocalSource(paths=[str(tmp_path / "train.jsonl")])], val_fraction=0.01), tmp_path / "data",
          download_dir=tmp_path / "dl")
    from model.data.dataset import iter_texts
    in_train = any(gsm[4]["question"].upper() in t for t in iter_texts(tmp_path / "data", "train"))
    out = tmp_path / "out"
    out.mkdir()
    from model.data import decontam
    metrics = decontam.run(13, 8, None, tmp_path / "data", {"chat_evalset": tmp_path / "chat"}, out, log=lambda m: None)
    report = json.loads((out / "decontam.json").read_text())["sets"]
    assert report["chat_evalset/gsm8k"]["items"] == len(load_sets(tmp_path / "chat")["gsm8k"]) == 6
    assert in_train  # the hash split put the planted document in train (fixed by its text)
    assert report["chat_evalset/gsm8k"]["contaminated"] == 1
    assert report["chat_evalset/gsm8k"]["examples"] == [4] and metrics["contaminated_by_set"] == {"chat_evalset/gsm8k": 1}
    assert "chat_evalset/gsm8k" in (out / "decontam.md").read_text()
    assert metrics["train_docs"] > 150
