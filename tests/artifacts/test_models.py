"""Hub push/pull on local files in the Hub's layout (the Hub itself is unreachable from tests)."""
import pytest

from artifacts.errors import ArtifactCorrupt, StoreError
from artifacts.manifest import Manifest
from artifacts.models import default_model, parse_hf, pick_model, pull, push, resolve_model
from artifacts.store import Store
from helpers import fake_hub


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A directory per repo standing in for the Hub; uploads copy into it, snapshots are read from it."""
    return fake_hub(tmp_path / "hub", monkeypatch)


def _artifact(store: Store) -> str:
    key = "ab" * 32
    with store.staging(key) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights" * 100)
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "tokenizer.json").write_text("{}")
        store.commit(tmp, Manifest(key=key, kind="checkpoint", stage="base", config={}, parents={"data": "cd" * 32}, code={}))
    store.set_ref("base/latest", key)
    return key


def test_parse_hf():
    assert parse_hf("hf://org/repo") == ("org/repo", None)
    assert parse_hf("hf://org/repo@v1") == ("org/repo", "v1")
    assert parse_hf("base/latest") is None
    with pytest.raises(StoreError, match="hf://org/repo"):
        parse_hf("hf://just-a-name")


def test_push_then_pull_into_another_store_keeps_key_and_lineage(hub, tmp_path):
    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    key = _artifact(a)
    url = push("base/latest", "hf://me/tiny", a)
    assert url == "hub://me/tiny/commit/1" and (hub / "me/tiny/manifest.json").exists()
    assert pull("hf://me/tiny", b) == key
    m = b.get(key)
    assert m.parents == {"data": "cd" * 32} and b.verify(key) == []
    assert b.resolve("base/me--tiny") == key
    assert (resolve_model("hf://me/tiny", b) / "tokenizer" / "tokenizer.json").read_text() == "{}"


def test_tampered_download_is_refused(hub, tmp_path):
    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    key = _artifact(a)
    push(key, "hf://me/tiny", a)
    (hub / "me/tiny/model.safetensors").write_bytes(b"Weights" * 100)  # same size, other bytes
    with pytest.raises(ArtifactCorrupt, match="model.safetensors does not match"):
        pull("hf://me/tiny", b)
    assert b.keys() == []


def test_missing_repo_and_foreign_repo(hub, tmp_path):
    store = Store(str(tmp_path / "s"))
    with pytest.raises(StoreError, match="could not download hf://me/nothing"):
        pull("hf://me/nothing", store)
    (hub / "me/foreign").mkdir(parents=True)
    (hub / "me/foreign/README.md").write_text("not ours")
    with pytest.raises(StoreError, match="is not a chatforge artifact"):
        pull("hf://me/foreign", store)


def test_local_refs_resolve_and_corrupt_ones_are_refused(tmp_path):
    store = Store(str(tmp_path / "s"))
    key = _artifact(store)
    assert resolve_model("base/latest", store) == tmp_path / "s" / "artifacts" / key
    (tmp_path / "s" / "artifacts" / key / "model.safetensors").write_bytes(b"W" + b"weights"[1:] + b"weights" * 99)
    with pytest.raises(ArtifactCorrupt):
        pull("base/latest", store)


def test_default_model_is_the_newest_chat_stage(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="no trained model in .*chatforge run --preset tiny"):
        default_model(store)
    store.set_ref("tokenizer/latest", "cd" * 32)  # not a chat model
    with pytest.raises(StoreError):
        default_model(store)
    for i, stage in enumerate(("base", "mid", "sft")):
        store.set_ref(f"{stage}/latest", f"{i}" * 64)
        assert default_model(store) == f"{stage}/latest"
    store.set_ref("base/tiny", "9" * 64)  # an older stage's newer ref does not win
    assert default_model(store) == "sft/latest"
    said = []
    assert pick_model(None, store, log=said.append) == "sft/latest" and "sft/latest (222222222222)" in said[0]
    assert pick_model("base/latest", store, log=said.append) == "base/latest" and len(said) == 1
