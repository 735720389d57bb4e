import json

import pytest
import torch

from model.nn.checkpoint import save_weights
from model.errors import InputError
from model.nn.gpt import GPT, GPTConfig
from model.nn.load import load_model


class _Tok:
    vocab_size = 300


def test_roundtrip_equals_original(tmp_path, monkeypatch):
    cfg = GPTConfig(vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, sequence_len=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    for p in model.parameters():  # zero-initialized parts would hide a bad load
        p.data.normal_()
    save_weights(model, tmp_path / "model.safetensors")
    (tmp_path / "model.json").write_text(json.dumps({"model": cfg.to_dict()}))
    monkeypatch.setattr("model.nn.load.Tokenizer.load", lambda d: _Tok())
    loaded, tok = load_model(tmp_path)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert tok.vocab_size == 300


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="is not a model checkpoint"):
        load_model(tmp_path)
