"""The `data` stage: shard layout, determinism, the pinned split, metrics, bad input, and the reader."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import dataset
from model.config import DataConfig, HubSource, LocalSource
from model.errors import InputError

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def write_texts(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:05d}.txt").write_text(text)
    return folder


def build(tmp_path: Path, name: str = "out", **config) -> tuple[Path, dict]:
    out = tmp_path / name
    out.mkdir()
    return out, dataset.build(DataConfig(**config), out, tmp_path / "downloads")


def split_of(key: str, doc_id: str, text: str, val_fraction: float) -> str:
    """The documented split rule, written out independently of the implementation."""
    u = int(hashlib.sha256(f"{key}\0{doc_id}\0{text}".encode()).hexdigest()[:8], 16) / 2**32
    return "val" if u < val_fraction else "train"


def test_builds_from_txt_jsonl_and_parquet(tmp_path):
    write_texts(tmp_path / "txt", ["  first text document \n", "second text document"])
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"json document {i}"}) + "\n" for i in range(20)))
    pq.write_table(pa.table({"body": [f"parquet document {i}" for i in range(30)]}), tmp_path / "rows.parquet")
    out, metrics = build(
        tmp_path, val_fraction=0.2,
        sources=[
            LocalSource(paths=[str(tmp_path / "txt")]),
            LocalSource(paths=[str(tmp_path / "docs.jsonl")]),
            LocalSource(paths=[str(tmp_path / "rows.parquet")], text_field="body"),
        ],
    )
    train, val = list(dataset.iter_texts(out, "train")), list(dataset.iter_texts(out, "val"))
    expected = {"first text document", "second text document"} | {f"json document {i}" for i in range(20)} | {f"parquet document {i}" for i in range(30)}
    assert sorted(train + val) == sorted(expected)  # stripped, none lost, none duplicated
    assert train and val
    assert metrics["docs"] == {"train": len(train), "val": len(val)}
    assert metrics["chars"] == {"train": sum(map(len, train)), "val": sum(map(len, val))}
    assert metrics["shards"] == {"train": 1, "val": 1}
    assert [p["docs"] for p in metrics["provenance"]] == [2, 20, 30]
    assert metrics["provenance"][1] == {
        "kind": "local",
        "identity": {"files": [{"path": str((tmp_path / "docs.jsonl").resolve()), "sha256": hashlib.sha256((tmp_path / "docs.jsonl").read_bytes()).hexdigest()}]},
        "docs": 20, "chars": sum(len(f"json document {i}") for i in range(20)),
    }
    assert "\n" not in metrics["split"] and "0.2" in metrics["split"]
    json.dumps(metrics)  # the metrics go into the manifest as JSON


def test_shards_row_groups_and_compression(tmp_path):
    texts = [f"document number {i}" for i in range(2500)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out, metrics = build(
        tmp_path, sources=[LocalSource(paths=[str(tmp_path / "docs.jsonl")])],
        val_fraction=0.01, docs_per_shard=1024, row_group_size=100,
    )
    train = dataset.list_shards(out, "train")
    assert [p.name for p in train] == ["train_00000.parquet", "train_00001.parquet", "train_00002.parquet"]
    assert [p.name for p in dataset.list_shards(out, "val")] == ["val_00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in train] + ["val_00000.parquet"]
    assert metrics["shards"] == {"train": 3, "val": 1}
    n_train = metrics["docs"]["train"]
    for i, path in enumerate(train):
        meta = pq.ParquetFile(path).metadata
        assert meta.schema.to_arrow_schema() == pa.schema([pa.field("text", pa.string())])
        assert meta.num_rows == min(1024, n_train - 1024 * i)  # full shards except the last
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        # Row groups of 100; a shard boundary cuts the last one short (1024 = 10 * 100 + 24).
        assert sizes == [100] * (meta.num_rows // 100) + ([meta.num_rows % 100] if meta.num_rows % 100 else [])
        assert {meta.row_group(g).column(0).compression for g in range(meta.num_row_groups)} == {"ZSTD"}
    # Shards are read back in order, a batch at a time.
    val = set(dataset.iter_texts(out, "val"))
    assert sorted(dataset.iter_texts(out, "train", batch_size=7)) == sorted(t for t in texts if t not in val)


def test_rebuild_is_byte_identical(tmp_path):
    write_texts(tmp_path / "txt", [f"text {i} " * (i + 1) for i in range(40)])
    config = dict(sources=[LocalSource(paths=[str(tmp_path / "txt" / "*.txt")])], val_fraction=0.25, row_group_size=8)
    first, m1 = build(tmp_path, "first", **config)
    second, m2 = build(tmp_path, "second", **config)
    assert m1 == m2
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and len(names) == 2
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_split_is_pinned_by_document(tmp_path):
    texts = [f"document {i}" for i in range(200)]
    write_texts(tmp_path / "corpus", texts)
    out, _ = build(tmp_path, sources=[LocalSource(paths=[str(tmp_path / "corpus")])], val_fraction=0.3)
    val = set(dataset.iter_texts(out, "val"))
    expected = {t for i, t in enumerate(texts) if split_of("local", f"doc{i:05d}.txt", t, 0.3) == "val"}
    assert val == expected and 30 < len(val) < 90
    # More documents elsewhere do not move these ones between splits.
    write_texts(tmp_path / "more", [f"another {i}" for i in range(50)])
    grown, _ = build(tmp_path, "grown", sources=[LocalSource(paths=[str(tmp_path / "corpus"), str(tmp_path / "more")])], val_fraction=0.3)
    assert set(dataset.iter_texts(grown, "val")) & set(texts) == val


@pytest.mark.parametrize("val_fraction", [0.001, 0.999])
def test_both_splits_non_empty(tmp_path, val_fraction):
    write_texts(tmp_path / "corpus", ["alpha document", "beta document", "gamma document"])
    out, metrics = build(tmp_path, sources=[LocalSource(paths=[str(tmp_path / "corpus")])], val_fraction=val_fraction)
    assert metrics["docs"]["train"] >= 1 and metrics["docs"]["val"] >= 1
    assert sorted([*dataset.iter_texts(out, "train"), *dataset.iter_texts(out, "val")]) == ["alpha document", "beta document", "gamma document"]


def test_min_chars_and_cap(tmp_path):
    write_texts(tmp_path / "corpus", ["short", "   \n  ", "long enough document", "another long document", "third long document"])
    out, metrics = build(tmp_path, sources=[LocalSource(paths=[str(tmp_path / "corpus")])], min_chars=10, max_docs_per_source=2, val_fraction=0.5)
    texts = sorted([*dataset.iter_texts(out, "train"), *dataset.iter_texts(out, "val")])
    assert texts == ["another long document", "long enough document"]  # the first two that pass, in source order
    assert metrics["provenance"][0]["docs"] == 2


def test_hub_sources_use_their_shards(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": [f"web page {i}.{j}" for j in range(5)]}), repo / f"shard_{i:05d}.parquet")
    pq.write_table(pa.table({"text": ["validation page", "  "]}), repo / "shard_00009.parquet")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(repo / filename))
    out, metrics = build(tmp_path, sources=[HubSource(repo_id="someone/web", num_train_shards=2, val_shard=9)])
    assert list(dataset.iter_texts(out, "train")) == [f"web page {i}.{j}" for i in range(2) for j in range(5)]
    assert list(dataset.iter_texts(out, "val")) == ["validation page"]
    assert metrics["provenance"][0]["identity"]["repo"] == "someone/web@main"
    assert metrics["provenance"][0]["docs"] == 11


def raises_one_line(fn, *needles: str) -> None:
    with pytest.raises(InputError) as info:
        fn()
    assert "\n" not in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


def test_bad_inputs_fail_with_one_line(tmp_path):
    write_texts(tmp_path / "blank", ["  ", "\n"])
    raises_one_line(lambda: build(tmp_path, "a", sources=[LocalSource(paths=[str(tmp_path / "blank")])]), "no documents", "data.sources")
    write_texts(tmp_path / "one", ["a single document"])
    raises_one_line(lambda: build(tmp_path, "b", sources=[LocalSource(paths=[str(tmp_path / "one")])]), "split is empty", "1 document")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    raises_one_line(lambda: build(tmp_path, "c", sources=[LocalSource(paths=[str(tmp_path / "bad.txt")])]), "bad.txt", "byte 3")
    raises_one_line(lambda: build(tmp_path, "d", sources=[LocalSource(paths=[str(tmp_path / "nothing*.jsonl")])]), "matches no file")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    raises_one_line(lambda: build(tmp_path, "e", sources=[LocalSource(paths=[str(tmp_path / "bad.jsonl")])]), "bad.jsonl:2")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(500)]}), tmp_path / "cut.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "cut.parquet").read_bytes()[:-100])
    raises_one_line(lambda: build(tmp_path, "f", sources=[LocalSource(paths=[str(tmp_path / "cut.parquet")])]), "truncated or corrupt parquet")
    not_empty = tmp_path / "g"
    not_empty.mkdir()
    (not_empty / "stale.parquet").write_bytes(b"")
    raises_one_line(lambda: dataset.build(DataConfig(sources=[LocalSource(paths=[str(tmp_path / "one")])]), not_empty, tmp_path), "not empty")


def test_list_shards_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError):
        dataset.list_shards(tmp_path, "test")
    assert dataset.list_shards(tmp_path, "val") == []


def test_main_prints_metrics_last(tmp_path, capsys):
    write_texts(tmp_path / "corpus", [f"document {i}" for i in range(10)])
    out = tmp_path / "out"
    out.mkdir()
    spec = tmp_path / "spec.json"
    config = DataConfig(sources=[LocalSource(paths=[str(tmp_path / "corpus")])])
    spec.write_text(json.dumps({"config": config.model_dump(mode="json"), "out_dir": str(out), "download_dir": str(tmp_path / "dl")}))
    dataset.main([str(spec)])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["docs"]["train"] + metrics["docs"]["val"] == 10

    empty = tmp_path / "empty"
    empty.mkdir()
    spec.write_text(json.dumps({"config": {"sources": [{"kind": "local", "paths": [str(empty / "*.txt")]}]}, "out_dir": str(tmp_path / "out2"), "download_dir": str(tmp_path)}))
    (tmp_path / "out2").mkdir()
    with pytest.raises(SystemExit) as info:
        dataset.main([str(spec)])
    assert "matches no file" in str(info.value.code)


def test_shared_corpus(tmp_path):
    corpus = SHARED_DATA / "corpus"
    if not corpus.is_dir():
        pytest.skip(f"{corpus} is absent (a fresh clone has no ../shared)")
    files = sorted(corpus.glob("*.jsonl"))
    lines = [json.loads(line)["text"] for path in files for line in path.read_text().splitlines() if line.strip()]
    expected = [t.strip() for t in lines if t.strip()]
    out, metrics = build(tmp_path, sources=[LocalSource(paths=[str(corpus / "*.jsonl")])])
    assert metrics["docs"]["train"] + metrics["docs"]["val"] == len(expected)
    assert 0.03 < metrics["docs"]["val"] / len(expected) < 0.07  # val_fraction 0.05
    assert [entry["path"] for entry in metrics["provenance"][0]["identity"]["files"]] == [str(p.resolve()) for p in files]
    assert sum(1 for _ in dataset.iter_texts(out, "val")) == metrics["docs"]["val"]
