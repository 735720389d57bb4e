"""`chatforge export`, `chatforge import` and `artifacts push --format transformers` against a real store (the CLI
in process; the Hub is a local directory in its layout)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import fake_hub, write_checkpoint

from artifacts.store import Store
from flows.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, its transformers export)."""
    from model.hf.export import export

    root = tmp_path_factory.mktemp("interop")
    ckpt = write_checkpoint(root)
    export(ckpt, root / "my-model", card="# a test model\n")
    return ckpt, root / "my-model"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def test_import_export_import_is_one_key_with_the_same_bytes(model_dir, tmp_path, capsys):
    ckpt, hf = model_dir
    store = tmp_path / "store"
    rc, out, err = run(capsys, "import", hf, "--store", store)
    assert rc == 0, err
    st = Store(str(store))
    key = st.resolve("import/my-model")
    m = st.get(key)
    assert (m.kind, m.stage, m.config["as_stage"], m.config["source"]) == ("checkpoint", "import", "sft", str(hf.resolve()))
    assert m.config["source_files"]["model.safetensors"] and m.parents == {}
    from model.nn.load import load_model

    assert m.metrics == {"params": load_model(st.local_path(key))[0].num_params()}  # the training stages' metric
    assert "ref import/my-model" in out and "chatforge stage rl --input sft=import/my-model" in out
    assert (st.local_path(key) / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()

    rc, out, err = run(capsys, "export", "import/my-model", tmp_path / "again", "--store", store)
    assert rc == 0, err
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    card = (tmp_path / "again" / "README.md").read_text()
    assert "nanochat" in card
    rc, out, err = run(capsys, "import", tmp_path / "again", "--store", store, "--name", "second")
    assert rc == 0, err
    assert st.resolve("import/second") == key and len(st.keys()) == 1  # its own export: the same artifact
    assert f"identical to the checkpoint it was exported from, {key[:12]}" in err


def test_our_export_comes_back_as_the_checkpoint_it_was_made_from(model_dir, tmp_path, capsys):
    """A store holding the original (here: the artifact an import made) recognises its export by the key in config.json
    and the file hashes; elsewhere, or with an origin the store lacks, the key is content-derived: the same bytes."""
    ckpt, hf = model_dir
    store = tmp_path / "store"
    assert run(capsys, "import", hf, "--store", store)[0] == 0
    st = Store(str(store))
    key = st.resolve("import/my-model")
    assert run(capsys, "export", key[:12], tmp_path / "out", "--store", store)[0] == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["chatforge"]["key"] == key
    other = tmp_path / "other"
    assert run(capsys, "import", tmp_path / "out", "--store", other)[0] == 0
    assert Store(str(other)).resolve("import/out") == key  # content-derived: the same bytes, the same key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["chatforge"]["key"] = "0" * 64  # an origin this store does not hold
    changed = _broken(tmp_path / "out", tmp_path / "changed", lambda d: (d / "config.json").write_text(json.dumps(config)))
    rc, out, err = run(capsys, "import", changed, "--store", store)
    assert rc == 0 and st.resolve("import/changed") == key  # an unknown origin: still content-derived, same bytes


def test_an_imported_model_chats(model_dir, tmp_path, capsys):
    store = tmp_path / "store"
    assert run(capsys, "import", model_dir[1], "--store", store)[0] == 0
    rc, out, err = run(capsys, "chat", "--model", "import/my-model", "-p", "What is 12 times 7?", "--temperature", "0",
                       "--max-tokens", "8", "--store", store)
    assert rc == 0, err
    assert out.strip()


def _broken(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    edit(dest)
    return dest


def _config(**changes):
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return edit


def _shapes(d: Path) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(d / "model.safetensors"))
    weights["model.layers.1.mlp.fc1.weight"] = weights["model.layers.1.mlp.fc1.weight"][:100]
    save_file(weights, str(d / "model.safetensors"))


BAD = {
    "no-config": (lambda d: (d / "config.json").unlink(), "is not a transformers model (no config.json)"),
    "llama": (_config(model_type="llama"), "model_type 'llama', not 'nanochat'"),
    "features": (_config(hidden_act="silu", attention_bias=True, tie_word_embeddings=True),
                 "features chatforge's GPT lacks: hidden_act 'silu' (chatforge: 'relu2'); attention_bias True"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights (model.safetensors"),
    "pickled": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "never unpickles"),
    "shapes": (_shapes, "model.layers.1.mlp.fc1.weight has shape (100, 64), expected (256, 64)"),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "corrupt": (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 100), "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_model_is_one_line_and_writes_nothing(case, model_dir, tmp_path, capsys):
    edit, message = BAD[case]
    src = _broken(model_dir[1], tmp_path / "src", edit)
    store = tmp_path / "store"
    rc, out, err = run(capsys, "import", src, "--store", store)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert tree(store) == {}  # no artifact, ref, lock or scratch file


def test_bad_arguments_are_one_line(model_dir, tmp_path, capsys):
    store = tmp_path / "store"
    for argv, message in [
        (("import", tmp_path / "nowhere"), "does not exist"),
        (("import", model_dir[1], "--name", "a/b"), "bad --name"),
        (("export", "base/latest", tmp_path / "out"), "base/latest"),
    ]:
        rc, out, err = run(capsys, *argv, "--store", store)
        assert rc == 1 and len(err.strip().splitlines()) == 1 and message in err, err
    assert run(capsys, "import", model_dir[1], "--store", store)[0] == 0
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    rc, out, err = run(capsys, "export", "import/my-model", full, "--store", store)
    assert rc == 1 and "not an empty directory" in err and tree(full) == {"keep.txt": b"mine"}


def test_push_as_transformers_and_import_from_the_hub(model_dir, tmp_path, capsys, monkeypatch):
    hub = fake_hub(tmp_path / "hub", monkeypatch)
    store = tmp_path / "store"
    assert run(capsys, "import", model_dir[1], "--store", store)[0] == 0
    rc, out, err = run(capsys, "artifacts", "push", "import/my-model", "hf://me/nano", "--format", "transformers", "--store", store)
    assert rc == 0, err
    assert json.loads((hub / "me/nano/config.json").read_text())["model_type"] == "nanochat"
    assert "me/nano" in (hub / "me/nano/README.md").read_text()
    assert not (hub / "me/nano/manifest.json").exists()
    rc, out, err = run(capsys, "import", "hf://me/nano", "--store", tmp_path / "other")
    assert rc == 0, err
    other = Store(str(tmp_path / "other"))
    assert other.resolve("import/me--nano") == Store(str(store)).resolve("import/my-model")
    assert other.get(other.resolve("import/me--nano")).config["repo"] == "me/nano"
    rc, out, err = run(capsys, "import", "hf://me/missing", "--store", tmp_path / "other")
    assert rc == 1 and "could not download hf://me/missing" in err
    rc, out, err = run(capsys, "chat", "--model", "hf://me/nano", "-p", "hi", "--store", tmp_path / "third")
    assert rc == 1 and "hf://me/nano is a transformers model, not a chatforge artifact: `chatforge import" in err


def test_a_trained_checkpoint_exported_and_imported_is_itself(model_dir, tmp_path, capsys):
    from artifacts.manifest import Manifest

    ckpt, _ = model_dir
    st = Store(str(tmp_path / "store"))
    key = "ab" * 32  # a stage's input-derived key, not a hash of the files
    with st.staging(key) as tmp:
        shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
        (tmp / "curve.json").write_text("[]")  # a training artifact holds more than the checkpoint files
        st.commit(tmp, Manifest(key=key, kind="checkpoint", stage="sft", config={}, parents={}, code={}))
    st.set_ref("sft/latest", key)
    assert run(capsys, "export", "sft/latest", tmp_path / "out", "--store", st.url)[0] == 0
    rc, out, err = run(capsys, "import", tmp_path / "out", "--store", st.url)
    assert rc == 0 and st.resolve("import/out") == key and st.keys() == [key]
