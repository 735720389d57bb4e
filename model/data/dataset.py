"""The `data` stage: the sources' documents as parquet shards with a pinned train/val split, and the reader.

Artifact layout: `train_00000.parquet`, … and `val_00000.parquet`, …, one string column `text`, zstd,
`docs_per_shard` documents per file in row groups of `row_group_size` (the loaders' unit of work).
The same config gives byte-identical files: order is fixed by the sources and nothing time-dependent is written.

    python -m model.data.dataset spec.json    # {"config": {...DataConfig...}, "out_dir": ..., "download_dir": ...}
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from model.data import sources
from model.config import DataConfig, HubSource, LocalSource, PypiSource
from model.errors import InputError
from model.progress import progress

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")
_SCHEMA = pa.schema([pa.field("text", pa.string())])


def build(cfg: DataConfig, out_dir: Path, download_dir: Path) -> dict:
    """Write the dataset into the existing empty `out_dir`; downloads are cached in `download_dir`. Returns metrics."""
    out_dir, download_dir = Path(out_dir), Path(download_dir)
    if any(out_dir.iterdir()):
        raise InputError(f"data: output directory {out_dir} is not empty: build into a fresh empty directory")
    writers = {split: _ShardWriter(out_dir, split, cfg.docs_per_shard, cfg.row_group_size) for split in SPLITS}
    pinned = _PinnedSplit(cfg.val_fraction)
    provenance = []
    try:
        with progress(desc="data", unit="doc") as bar:
            for source in cfg.sources:
                bar.set_description_str(f"data {source.kind}")
                docs = chars = 0
                for split, stream in _streams(source, download_dir):
                    for doc_id, text in _kept(stream, cfg):
                        if split is None:
                            pinned.route(_split_key(source), doc_id, text, writers)
                        else:
                            writers[split].add(text)
                        docs += 1
                        chars += len(text)
                        bar.update()
                provenance.append({"kind": source.kind, "identity": sources.identity(source), "docs": docs, "chars": chars})
            pinned.finish(writers)
    finally:
        for writer in writers.values():
            writer.close()

    total = sum(w.docs for w in writers.values())
    if total == 0:
        raise InputError(
            "data: the sources produced no documents (after stripping and the min_chars filter): "
            "check data.sources paths/globs"
        )
    for split in SPLITS:
        if writers[split].docs == 0:
            raise InputError(
                f"data: the {split} split is empty ({total} document(s) in all): add documents to data.sources "
                "(hub sources: check that the val shard has text)"
            )
    return {
        "docs": {s: w.docs for s, w in writers.items()},
        "chars": {s: w.chars for s, w in writers.items()},
        "shards": {s: w.shards for s, w in writers.items()},
        "provenance": provenance,
        "split": pinned.rule(),
    }


def list_shards(dataset_dir: Path, split: str) -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return sorted(Path(dataset_dir).glob(f"{split}_*.parquet"))


def iter_texts(dataset_dir: Path, split: str, batch_size: int = 1024) -> Iterator[str]:
    """The documents of one split in order, read a row group at a time (never a whole shard)."""
    for path in list_shards(dataset_dir, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["text"]):
            yield from batch.column(0).to_pylist()


def _streams(source: HubSource | LocalSource | PypiSource, download_dir: Path) -> list[tuple[Split | None, Iterator[sources.Doc]]]:
    """The source's documents; a split of None means the hash rule decides."""
    if isinstance(source, HubSource):
        return [(split, sources.read_hub(source, download_dir, split)) for split in SPLITS]
    if isinstance(source, LocalSource):
        return [(None, sources.read_local(source))]
    return [(None, sources.read_pypi(source, download_dir))]


def _kept(docs: Iterable[sources.Doc], cfg: DataConfig) -> Iterator[sources.Doc]:
    stripped = ((doc_id, text.strip()) for doc_id, text in docs)
    kept = ((doc_id, text) for doc_id, text in stripped if len(text) >= cfg.min_chars)
    # For a hub source this caps the train and the val shards separately, so a capped run still validates.
    return itertools.islice(kept, cfg.max_docs_per_source)


def _split_key(source: LocalSource | PypiSource) -> str:
    # Not the file hashes: editing one file must not move the other documents between splits.
    return f"pypi:{source.package}=={source.version}" if isinstance(source, PypiSource) else "local"


class _PinnedSplit:
    """val iff a hash of (source key, doc id, text) falls below val_fraction; if that leaves a split empty,
    the document nearest the threshold moves into it. To stay streaming, the document nearest the threshold
    on each side is held back and written last."""

    def __init__(self, val_fraction: float):
        self.val_fraction = val_fraction
        self.held: dict[Split, tuple[float, str] | None] = {"train": None, "val": None}

    def route(self, key: str, doc_id: str, text: str, writers: dict[Split, _ShardWriter]) -> None:
        digest = hashlib.sha256(f"{key}\0{doc_id}\0{text}".encode()).hexdigest()
        u = int(digest[:8], 16) / 2**32
        split: Split = "val" if u < self.val_fraction else "train"
        held = self.held[split]
        if held is None or abs(u - self.val_fraction) < abs(held[0] - self.val_fraction):
            self.held[split] = (u, text)
            if held is None:
                return
            text = held[1]
        writers[split].add(text)

    def finish(self, writers: dict[Split, _ShardWriter]) -> None:
        count = {s: writers[s].docs + (self.held[s] is not None) for s in SPLITS}
        for split, held in self.held.items():
            if held is None:
                continue
            other: Split = "val" if split == "train" else "train"
            writers[other if count[other] == 0 and count[split] >= 2 else split].add(held[1])

    def rule(self) -> str:
        return (
            f"local/pypi documents: val iff int(sha256(key + '\\0' + doc_id + '\\0' + text)[:8], 16) / 2**32 < "
            f"{self.val_fraction} (key 'local' or 'pypi:name==version'; if a split would be empty, the document "
            "nearest the threshold moves into it); hub sources: train shards -> train, val shard -> val"
        )


class _ShardWriter:
    """Streams one split into `<split>_NNNNN.parquet` files; holds at most one row group in memory."""

    def __init__(self, out_dir: Path, split: Split, docs_per_shard: int, row_group_size: int):
        self.out_dir, self.split = out_dir, split
        self.docs_per_shard, self.row_group_size = docs_per_shard, row_group_size
        self.docs = self.chars = self.shards = 0
        self._buffer: list[str] = []
        self._in_shard = 0
        self._writer: pq.ParquetWriter | None = None

    def add(self, text: str) -> None:
        self._buffer.append(text)
        self.docs += 1
        self.chars += len(text)
        if len(self._buffer) == self.row_group_size or self._in_shard + len(self._buffer) == self.docs_per_shard:
            self._flush()

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            path = self.out_dir / f"{self.split}_{self.shards:05d}.parquet"
            # No dictionary or min/max statistics: useless for whole documents, and they bloat the footer.
            self._writer = pq.ParquetWriter(path, _SCHEMA, compression="zstd", use_dictionary=False, write_statistics=False)
            self.shards += 1
        self._writer.write_table(pa.table({"text": self._buffer}, schema=_SCHEMA), row_group_size=len(self._buffer))
        self._in_shard += len(self._buffer)
        self._buffer = []
        if self._in_shard == self.docs_per_shard:
            self._writer.close()
            self._writer = None
            self._in_shard = 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m model.data.dataset SPEC.json")
    spec = json.loads(Path(args[0]).read_text())
    cfg = DataConfig.model_validate(spec["config"])
    try:
        metrics = build(cfg, Path(spec["out_dir"]), Path(spec["download_dir"]))
    except InputError as e:
        raise SystemExit(str(e)) from None  # the one-line message on stderr, exit status 1
    print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    main()
