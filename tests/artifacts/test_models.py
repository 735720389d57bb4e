"""Hub push/pull on local files in the Hub's layout (the Hub itself is unreachable from tests)."""
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from artifacts.errors import ArtifactCorrupt, StoreError
from artifacts.manifest import Manifest
from artifacts.models import parse_hf, pull, push, resolve_model
from artifacts.store import Store


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A directory per repo standing in for the Hub; uploads copy into it, snapshots are read from it."""
    root = tmp_path / "hub"
    calls = {}

    def create_repo(self, repo_id, **kw):
        (root / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls["token_seen"] = kw.get("token")
        shutil.copytree(folder_path, root / repo_id, dirs_exist_ok=True)
        return type("Info", (), {"commit_url": f"hub://{repo_id}/commit/1"})()

    def snapshot_download(repo_id, revision=None, cache_dir=None, **kw):
        if not (root / repo_id).exists():
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found", response=_resp())
        dest = Path(cache_dir) / repo_id.replace("/", "--")
        shutil.copytree(root / repo_id, dest, dirs_exist_ok=True)
        return str(dest)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return root


def _resp():
    import httpx

    return httpx.Response(404, request=httpx.Request("GET", "https://hub.invalid"))


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
