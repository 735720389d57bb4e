import json
import os
import subprocess
import sys
import threading
import time

import pytest

from artifacts.errors import ArtifactCorrupt, ArtifactMissing, StoreError
from artifacts.keys import artifact_key
from artifacts.manifest import Manifest
from artifacts.store import Store


def _commit(store: Store, key: str, files: dict[str, bytes], parents=None) -> Manifest:
    with store.lock(key):
        with store.staging(key) as tmp:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            return store.commit(tmp, Manifest(key=key, kind="dataset", stage="data", config={}, parents=parents or {}, code={}))


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    s = Store(f"memory://bucket-{tmp_path.name}")
    s.local_root = tmp_path / "local"  # keep staging and locks inside the test's directory
    return s


def test_keys_are_input_addressed():
    a = artifact_key("data", {"x": 1, "y": [1, 2]}, {"in": "k1"}, "code")
    assert a == artifact_key("data", {"y": [1, 2], "x": 1}, {"in": "k1"}, "code")  # dict order is irrelevant
    assert len({a, artifact_key("data", {"x": 2, "y": [1, 2]}, {"in": "k1"}, "code"),
                artifact_key("data", {"x": 1, "y": [1, 2]}, {"in": "k2"}, "code"),
                artifact_key("data", {"x": 1, "y": [1, 2]}, {"in": "k1"}, "code2"),
                artifact_key("tok", {"x": 1, "y": [1, 2]}, {"in": "k1"}, "code")}) == 5


def test_commit_roundtrip_and_manifest(store):
    m = _commit(store, "a" * 64, {"x.txt": b"hello", "sub/y.bin": b"\0\1"})
    assert store.keys() == ["a" * 64]
    got = store.get("a" * 64)
    assert got.files["x.txt"]["size"] == 5 and got.files["sub/y.bin"]["size"] == 2
    assert got.created and got.host and m.key == got.key
    assert store.verify("a" * 64) == []
    assert (store.local_path("a" * 64) / "x.txt").read_bytes() == b"hello"


def test_missing_and_refs(store):
    with pytest.raises(ArtifactMissing):
        store.get("b" * 64)
    _commit(store, "c" * 64, {"f": b"1"})
    store.set_ref("data/latest", "c" * 64)
    assert store.resolve("data/latest") == "c" * 64
    assert store.resolve("cccccc") == "c" * 64
    with pytest.raises(ArtifactMissing, match="unknown ref"):
        store.resolve("data/nope")
    with pytest.raises(StoreError, match="bad ref"):
        store.set_ref("a/b/c", "c" * 64)


def test_flipped_byte_is_detected_by_verify_and_on_read(tmp_path):
    store = Store(str(tmp_path))
    key = "d" * 64
    _commit(store, key, {"data.bin": bytes(range(200))})
    path = tmp_path / "artifacts" / key / "data.bin"
    raw = bytearray(path.read_bytes())
    raw[17] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert store.verify(key) == ["data.bin: sha256 mismatch"]
    with pytest.raises(ArtifactCorrupt, match="data.bin"):
        store.manifest(key)
    store.quarantine(key)
    assert store.manifest(key) is None and store.keys() == []


def test_truncated_file_is_a_size_error(tmp_path):
    store = Store(str(tmp_path))
    key = "e" * 64
    _commit(store, key, {"big.bin": b"x" * 1000})
    (tmp_path / "artifacts" / key / "big.bin").write_bytes(b"x" * 10)
    with pytest.raises(ArtifactCorrupt, match="size 10 != 1000"):
        store.manifest(key)


def test_staging_without_commit_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.staging("f" * 64) as tmp:
            (tmp / "half.bin").write_bytes(b"half")
            raise RuntimeError("crash")
    assert store.keys() == []
    assert not list((store.local_root / "tmp").iterdir())


def test_unknown_scheme_and_unwritable_root(tmp_path):
    with pytest.raises(StoreError, match="unknown store scheme 'nope'"):
        Store("nope://bucket/x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write read-only directories (root without CAP restrictions)")
        with pytest.raises(StoreError, match="not writable"):
            Store(str(ro / "store")).ensure_writable()
    finally:
        ro.chmod(0o700)


def test_unwritable_root_file_in_the_way(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="not writable"):
        Store(str(blocker / "store")).ensure_writable()
    assert blocker.read_text() == "not a directory"


def test_lock_serializes_and_survives_kill(tmp_path):
    store = Store(str(tmp_path))
    key = "9" * 64
    # a child holds the lock, then is killed -9: the kernel releases it
    code = (
        "import sys, time; sys.path.insert(0, %r); from artifacts.store import Store;"
        "s = Store(%r); cm = s.lock(%r); cm.__enter__(); print('held', flush=True); time.sleep(60)"
    ) % (os.getcwd(), str(tmp_path), key)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    assert store.is_locked(key)
    waited = []
    t = threading.Thread(target=lambda: store.lock(key, on_wait=lambda: waited.append(1)).__enter__())
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and waited == [1]
    child.kill()
    child.wait()
    t.join(timeout=10)
    assert not t.is_alive()


def test_gc_removes_temporary_and_unreferenced(tmp_path):
    store = Store(str(tmp_path))
    parent, child, orphan = "1" * 64, "2" * 64, "3" * 64
    _commit(store, parent, {"p": b"p"})
    _commit(store, child, {"c": b"c"}, parents={"data": parent})
    _commit(store, orphan, {"o": b"o"})
    store.set_ref("tokenizer/latest", child)
    (tmp_path / "tmp" / f"{'4' * 64}.dead").mkdir(parents=True)  # a crashed compute's staging
    (tmp_path / "artifacts" / ("5" * 64)).mkdir()  # a directory without a manifest
    planned = store.gc(dry_run=True)
    assert len(planned.deleted) == 3 and store.keys() == sorted([parent, child, orphan])
    store.gc()
    assert store.keys() == sorted([parent, child])  # the parent is kept through lineage
    assert not (tmp_path / "tmp" / f"{'4' * 64}.dead").exists()
    assert not (tmp_path / "artifacts" / ("5" * 64)).exists()


def test_manifest_is_json_with_lineage(tmp_path):
    store = Store(str(tmp_path))
    _commit(store, "6" * 64, {"a": b"a"}, parents={"data": "1" * 64})
    d = json.loads((tmp_path / "artifacts" / ("6" * 64) / "manifest.json").read_text())
    assert d["parents"] == {"data": "1" * 64} and d["files"]["a"]["size"] == 1 and d["schema"] == 1
