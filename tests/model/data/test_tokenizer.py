"""Tokenizer stage: training, the artifact files, the wrapper, the compression report."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer as HFTokenizer

from model.data.compression import SAMPLES, report
from model.config import SPECIAL_TOKENS, TokenizerConfig
from model.errors import InputError
from model.data.tokenizer import COMPRESSION_FILE, TOKEN_BYTES_FILE, TOKENIZER_FILE, Tokenizer, train

REPO = Path(__file__).resolve().parents[3]
SHARED_DATA = REPO.parent / "shared" / "data"
REFERENCE_DIR = SHARED_DATA / "tokenizers"
needs_references = pytest.mark.skipif(
    not (REFERENCE_DIR / "r50k_base.tiktoken").is_file(),
    reason=f"reference rank files not found in {REFERENCE_DIR} (outside a full checkout)",
)

VOCAB = 600
ARTIFACT_FILES = (TOKENIZER_FILE, TOKEN_BYTES_FILE, COMPRESSION_FILE)

UNICODE_TEXTS = [
    "Hello, world! It's 2024-06-01 and the price is $1,234,567.89.",
    "naïve café — «guillemets» and ‘quotes’; Grüße aus Köln.",
    "日本語のテキストと中文文本, 한국어 문장도 있습니다.",
    "emoji: 🙂🚀👩‍👩‍👧 ✔️ and flags 🇫🇷🇯🇵",
    "tabs\tand\nnewlines\r\n  indented\u00a0nbsp \x00 nul and \u200b zero-width",
    "combining: e\u0301 a\u0308 and math: ∑_{i=1}^{n} i² = n(n+1)/2 ≤ ∞",
    "<|bos|> is just text here, as is <|assistant_end|>",
]


def _docs(n: int, seed: int) -> list[str]:
    """Documents with enough variety for a few hundred merges: common words, made-up words,
    numbers, code and some non-ASCII."""
    rng = random.Random(seed)
    common = ("the of and to in is was for on that with as by at from his her they have this which one "
              "had were but not are an all their been has more when who will would there other").split()
    syllables = "ka lo mi ter ran sho vel qu ix ane ber tum zu ol ph yst ing ed er est".split()
    extras = ["café", "naïve", "日本語", "Привет", "мир", "🙂", "🚀", "x²", "e=mc^2", "\n", "\n\n",
              "def f(x):\n    return x + 1\n", "for i in range(10):", "{'a': [1, 2]}", "—", "«»"]
    docs = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(40, 160)):
            r = rng.random()
            if r < 0.6:
                words.append(rng.choice(common))
            elif r < 0.85:
                words.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
            elif r < 0.93:
                words.append(rng.choice(extras))
            else:
                words.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            if rng.random() < 0.1:
                words[-1] += rng.choice(".,;:!?")
        docs.append(" ".join(words).capitalize())
    return docs


def _write_split(dataset_dir: Path, split: str, shards: list[list[str]]) -> None:
    for i, texts in enumerate(shards):
        table = pa.table({"text": pa.array(texts, type=pa.string())})
        pq.write_table(table, dataset_dir / f"{split}_{i:05d}.parquet")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dataset")
    _write_split(d, "train", [_docs(300, 1), _docs(300, 2)])
    _write_split(d, "val", [_docs(50, 3)])
    return d


def _cfg(**overrides) -> TokenizerConfig:
    fields = dict(vocab_size=VOCAB, max_chars=400_000, doc_cap=2_000, threads=1,
                  reference_dir=str(REFERENCE_DIR) if REFERENCE_DIR.is_dir() else None)
    return TokenizerConfig(**{**fields, **overrides})


def _train(dataset: Path, out: Path, **overrides) -> dict:
    out.mkdir()
    return train(_cfg(**overrides), dataset, out, download_dir=None)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "tokenizer"
    return out, _train(dataset, out)


@pytest.fixture(scope="module")
def tok(trained) -> Tokenizer:
    return Tokenizer.load(trained[0])


def test_metrics_and_files(trained):
    out, metrics = trained
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACT_FILES)
    assert metrics["vocab_size"] == VOCAB
    assert 0 < metrics["train_chars"] <= 400_000 and metrics["train_docs"] > 100
    assert metrics["chars_per_second"] > 0
    json.dumps(metrics)  # JSON-serialisable


def test_max_chars_and_doc_cap_bound_the_text_fed(dataset, tmp_path):
    metrics = _train(dataset, tmp_path / "t", max_chars=50_000, doc_cap=100, vocab_size=400)
    assert metrics["train_chars"] == 50_000
    assert metrics["train_docs"] == 500  # every test document is longer than 100 chars


def test_exact_vocab_size(tok, trained):
    assert tok.vocab_size == VOCAB
    hf = HFTokenizer.from_file(str(trained[0] / TOKENIZER_FILE))
    assert hf.get_vocab_size(with_added_tokens=True) == VOCAB
    assert sorted(hf.get_vocab(with_added_tokens=True).values()) == list(range(VOCAB))


def test_special_tokens_are_single_ids(tok, trained):
    ids = [tok.special_id(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))  # documented: specials come first, in order
    assert tok.bos_id == tok.special_id("<|bos|>") == 0
    # The HF file itself knows them as special tokens...
    hf = HFTokenizer.from_file(str(trained[0] / TOKENIZER_FILE))
    for name in SPECIAL_TOKENS:
        assert hf.encode(name).ids == [tok.special_id(name)]
    # ...while the wrapper keeps a special token's name inside text as plain text.
    assert tok.encode("<|bos|>") != [tok.bos_id]
    assert tok.bos_id not in tok.encode("say <|bos|> and <|user_end|>")
    assert tok.decode([tok.bos_id, *tok.encode("hi")]) == "<|bos|>hi"
    with pytest.raises(KeyError):
        tok.special_id("<|eos|>")


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_roundtrip_arbitrary_unicode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB for i in ids)
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(UNICODE_TEXTS) == [tok.encode(t) for t in UNICODE_TEXTS]


def test_digit_runs_split_into_at_most_two_digits(tok):
    for text in ["1234567", "year 2024: 99999 items", "3.14159265"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        for i in ids:
            assert sum(c.isdigit() for c in tok.decode([i])) <= 2, (text, tok.decode([i]))


def test_token_bytes(tok, trained):
    tensors = load_file(str(trained[0] / TOKEN_BYTES_FILE))
    assert list(tensors) == ["token_bytes"]
    token_bytes = tensors["token_bytes"]
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (VOCAB,)
    specials = {tok.special_id(name) for name in SPECIAL_TOKENS}
    hf = HFTokenizer.from_file(str(trained[0] / TOKENIZER_FILE))
    partial_utf8 = 0
    for i in range(VOCAB):
        if i in specials:
            assert token_bytes[i] == 0
            continue
        decoded = tok.decode([i])
        if "\ufffd" in decoded:
            # Holds part of a multi-byte character, which decode can't show: one byte per byte-level char.
            partial_utf8 += 1
            assert token_bytes[i] == len(hf.id_to_token(i)) >= 1
        else:
            assert token_bytes[i] == len(decoded.encode("utf-8")), i
    assert partial_utf8 < 200
    # What bits-per-byte relies on: the bytes of a text's tokens add up to the text's bytes.
    for text in UNICODE_TEXTS:
        assert token_bytes[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_rerun_is_byte_identical_across_processes_and_thread_counts(dataset, trained, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    spec = {"config": _cfg(threads=2).model_dump(), "dataset_dir": str(dataset),
            "out_dir": str(out), "download_dir": None}  # offline, as the in-process run
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "model.data.tokenizer", str(tmp_path / "spec.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["vocab_size"] == VOCAB
    assert metrics["compression"] == trained[1]["compression"]
    for name in ARTIFACT_FILES:
        assert (out / name).read_bytes() == (trained[0] / name).read_bytes(), name


@needs_references
def test_compression_report_against_references(trained):
    out, metrics = trained
    compression = metrics["compression"]
    assert compression["available"] == {"r50k_base": True, "cl100k_base": True}
    sources = compression["sources"]
    assert set(sources) == {"train", "val", *SAMPLES}
    english = sources["sample: english"]
    assert english["bytes"] == len(SAMPLES["sample: english"].encode("utf-8"))
    assert 3.5 <= english["r50k_base"] <= 5.5
    code = sources["sample: code"]
    assert code["cl100k_base"] > code["r50k_base"]  # GPT-4 has tokens for runs of indentation, GPT-2 hardly
    for row in sources.values():
        assert row["ours"] > 0
    # Our 600-token vocabulary cannot beat GPT-2's 50k on English prose.
    assert compression["relative_pct"]["sample: english"]["r50k_base"] < 0
    markdown = (out / COMPRESSION_FILE).read_text()
    assert "| sample: english |" in markdown and "r50k_base (GPT-2)" in markdown
    assert "not available" not in markdown


@needs_references
def test_references_are_tiktokens_encodings():
    from model.data.compression import reference_encoding

    gpt2 = reference_encoding("r50k_base", REFERENCE_DIR, None)
    gpt4 = reference_encoding("cl100k_base", REFERENCE_DIR, None)
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt4.encode("hello world") == [15339, 1917]
    assert gpt2.n_vocab == 50257


def test_missing_references_are_not_available(tok, dataset, tmp_path):
    empty = tmp_path / "no_ranks"
    empty.mkdir()
    (empty / "r50k_base.tiktoken").write_bytes(b"YQ== 0\n")  # wrong hash: refused, not trusted
    markdown, result = report(tok, _cfg(reference_dir=str(empty)), dataset, download_dir=None)
    assert result["available"] == {"r50k_base": False, "cl100k_base": False}
    for source, row in result["sources"].items():
        assert row["r50k_base"] is None and row["cl100k_base"] is None
        assert row["ours"] > 0
        assert result["relative_pct"][source] == {"r50k_base": None, "cl100k_base": None}
    assert "| not available | not available |" in markdown


def test_unknown_reference_encoding_is_an_input_error(tok, dataset):
    with pytest.raises(InputError, match="gpt5_base"):
        report(tok, _cfg(reference_encodings=["gpt5_base"]), dataset, download_dir=None)


def test_empty_train_split_is_an_input_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_split(data, "train", [[]])
    with pytest.raises(InputError, match="no text"):
        _train(data, tmp_path / "out")


def test_entry_point_reports_input_errors_on_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_split(data, "train", [[""]])
    (tmp_path / "out").mkdir()
    spec = {"config": {"vocab_size": VOCAB}, "dataset_dir": str(data), "out_dir": str(tmp_path / "out"),
            "download_dir": None}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "model.data.tokenizer", str(tmp_path / "spec.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    # a split of one empty document: the vocab preflight (before the trainer allocates) is the first to object
    assert proc.stderr.strip().splitlines()[-1].startswith(f"tokenizer.vocab_size={VOCAB} is more than BPE can learn")
    assert "Traceback" not in proc.stderr


def test_missing_train_split_is_an_input_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_split(data, "val", [["some text"]])
    with pytest.raises(InputError, match="no train shards"):
        _train(data, tmp_path / "out")


def test_too_little_text_for_the_vocab_is_an_input_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_split(data, "train", [["abab cdcd " * 20]])
    with pytest.raises(InputError, match=r"stopped at \d+ tokens, short of tokenizer.vocab_size=600") as e:
        _train(data, tmp_path / "out")
    assert "\n" not in str(e.value)


def test_report_without_references(tok, dataset):
    markdown, result = report(tok, _cfg(reference_encodings=[]), dataset, download_dir=None)
    assert result["available"] == {}
    assert "| source | bytes | ours |\n| --- | ---: | ---: |\n" in markdown
    assert result["sources"]["sample: english"]["ours"] == round(
        len(SAMPLES["sample: english"].encode()) / len(tok.encode(SAMPLES["sample: english"])), 4)
