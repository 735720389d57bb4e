"""A checkpoint exported as a transformers `nanochat` model behaves as ours does in transformers (CPU, fp32), and the
import is its exact inverse."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import HF_TEXT, opinionated_gpt, small_bpe, write_checkpoint
from model.chat.conversation import render_for_completion
from model.chat.engine import Engine
from model.data.tokenizer import TOKENIZER_FILE
from model.hf import mapping
from model.hf.export import export
from model.hf.importer import to_checkpoint
from model.nn.gpt import ROPE_BASE, SOFTCAP, VOCAB_MULTIPLE, GPTConfig
from model.nn.load import load_model

transformers = pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    ckpt = write_checkpoint(root)
    export(ckpt, root / "hf", card="# test model\n", provenance={"key": "k" * 64})
    return ckpt, root / "hf"


def test_the_directory_is_a_nanochat_model(exported):
    ckpt, hf = exported
    assert sorted(p.name for p in hf.iterdir()) == sorted([
        "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"])
    config = json.loads((hf / "config.json").read_text())
    meta = json.loads((ckpt / "model.json").read_text())["model"]
    assert config["model_type"] == "nanochat" and config["vocab_size"] == meta["vocab_size"] == 300
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["final_logit_softcapping"]) == (2, 2, SOFTCAP)
    assert config["chatforge"] == {"key": "k" * 64, "stage": "sft", "step": 7}
    gen = json.loads((hf / "generation_config.json").read_text())
    tok = load_model(ckpt)[1]
    assert gen["eos_token_id"][0] == tok.special_id("<|assistant_end|>") == config["eos_token_id"]
    assert not list(hf.parent.glob(".hf.tmp-*"))  # written beside and renamed into place


def test_logits_equal_ours(exported):
    ckpt, hf = exported
    ours, _ = load_model(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "NanoChatForCausalLM"
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.shape == b.shape == (3, 40, 300)
    assert (a - b).abs().max().item() <= 1e-5


def test_greedy_generation_equals_our_engine(exported):
    ckpt, hf = exported
    ours, tok = load_model(ckpt)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    for prompt in ([tok.bos_id] + tok.encode("The quick brown"), [tok.bos_id] + tok.encode("Paris is")):
        mine = [row[0][0] for row in Engine(ours, tok).generate([prompt], 32, temperature=0.0) if row[0] is not None]
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out[0, len(prompt):].tolist() == mine
        assert len(mine) == 32 or mine[-1] in (tok.bos_id, tok.special_id("<|assistant_end|>"))


def test_chat_template_gives_our_prompt_ids(exported):
    ckpt, hf = exported
    tok = load_model(ckpt)[1]
    theirs = transformers.AutoTokenizer.from_pretrained(hf)
    conversations = [
        [{"role": "user", "content": "What is 12 times 7?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Germany?"}],
        [{"role": "user", "content": "12*7?"}, {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."}, {"type": "python", "text": "12*7"},
            {"type": "python_output", "text": "84"}, {"type": "text", "text": "It is 84."}]},
         {"role": "user", "content": "Thanks"}],
    ]
    for messages in conversations:
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == render_for_completion(messages, tok)


def test_pipeline_chats_with_the_exported_directory(exported):
    ckpt, hf = exported
    ours, tok = load_model(ckpt)
    pipe = transformers.pipeline("text-generation", model=str(hf), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is 12 times 7?"}]
    reply = pipe(messages, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    prompt = render_for_completion(messages, tok)
    mine = [row[0][0] for row in Engine(ours, tok).generate([prompt], 12, temperature=0.0) if row[0] is not None]
    ends = (tok.bos_id, tok.special_id("<|assistant_end|>"))
    text = tok._hf.decode([t for t in mine if t not in ends], skip_special_tokens=True)
    assert reply["content"] == text


def test_round_trip_gives_back_the_same_bytes(exported, tmp_path):
    ckpt, hf = exported
    back = tmp_path / "back"
    info = to_checkpoint(hf, back)
    assert info["stage"] == "sft" and info["step"] == 7 and info["exported_from"] == "k" * 64 and info["notes"] == []
    for rel in ("model.safetensors", "model.json", "tokenizer/tokenizer.json", "tokenizer/token_bytes.safetensors"):
        assert (back / rel).read_bytes() == (ckpt / rel).read_bytes(), rel


def test_padded_rows_stay_zero_in_training():
    """The round trip's premise: rows past the vocabulary start at zero and no optimizer step moves them."""
    from model.config import BaseConfig
    from model.nn.optim import build_optimizers

    model = opinionated_gpt(300, 32)
    model.init_weights()
    opts = build_optimizers(model, BaseConfig(), world_size=1)
    for _ in range(3):
        ids = torch.randint(0, 300, (2, 32))
        model(ids, targets=ids).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert not model.embed.weight[300:].any() and not model.lm_head.weight[300:].any()
    assert model.embed.weight[:300].any()


def test_a_random_init_transformers_model_imports_exactly(tmp_path):
    tok = small_bpe(HF_TEXT, 300)
    config = transformers.NanoChatConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=mapping.OUR_EPS,
        bos_token_id=tok.bos_id, eos_token_id=tok.bos_id, pad_token_id=tok.bos_id)
    torch.manual_seed(0)
    theirs = transformers.NanoChatForCausalLM(config).eval()
    src = tmp_path / "src"
    theirs.save_pretrained(src)
    tok._hf.save(str(src / TOKENIZER_FILE))
    to_checkpoint(src, tmp_path / "ckpt")
    ours, _ = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-5
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text())["stage"] == "base"


def test_mapping_is_one_table_with_its_inverse():
    model = opinionated_gpt(300, 32)
    assert set(mapping.names(2)) == set(model.state_dict())
    hf = transformers.NanoChatForCausalLM(transformers.NanoChatConfig(
        vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4))
    assert set(mapping.inverse(2)) == set(hf.state_dict())
    # mapping.py keeps its own copies (gpt.py imports torch): pinned to the GPT's
    assert (mapping.SOFTCAP, mapping.ROPE_THETA, mapping.VOCAB_MULTIPLE) == (SOFTCAP, ROPE_BASE, VOCAB_MULTIPLE)
    assert mapping.OUR_EPS == torch.finfo(torch.float32).eps
    assert all(mapping.padded(v) == GPTConfig(v, 1, 1, 1, 2, 8).padded_vocab_size for v in (1, 63, 64, 65, 300))
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    back = mapping.from_hf(mapping.to_hf(weights, model.config.to_dict()), model.config.to_dict())
    assert all(np.array_equal(back[k][:300], weights[k][:300]) for k in weights)


def test_another_norm_epsilon_is_a_note_and_a_large_one_a_refusal():
    config = mapping.hf_config({"vocab_size": 300, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                                "sequence_len": 64}, bos_id=0, eos_id=4, pad_id=0)
    assert mapping.our_config(config, 300)[1] == []
    ours, notes = mapping.our_config({**config, "rms_norm_eps": 1e-6, "vocab_size": 320}, 300)
    assert ours["vocab_size"] == 300 and len(notes) == 2 and "rms_norm_eps 1e-06" in notes[0] and "300..319" in notes[1]
    with pytest.raises(Exception, match=r"rope_theta 500000.0 .*; rms_norm_eps 0.0001 "):
        mapping.our_config({**config, "rms_norm_eps": 1e-4, "rope_parameters": {"rope_theta": 5e5}}, 300)


def test_a_base_model_has_no_chat_template_and_ends_at_bos(tmp_path):
    ckpt = write_checkpoint(tmp_path, stage="base")
    export(ckpt, tmp_path / "hf", card="# base\n")
    assert not (tmp_path / "hf" / "chat_template.jinja").exists()
    tok = load_model(ckpt)[1]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == tok.bos_id
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs("<|bos|>The quick").input_ids == [tok.bos_id] + tok.encode("The quick")  # the card's base usage
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), dtype=torch.float32)
    text = pipe("The quick brown", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith("The quick brown") and len(text) > len("The quick brown")


def test_the_export_needs_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = "import sys, model.hf.export, model.hf.mapping; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[3])
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_a_large_import_shows_its_progress(exported, tmp_path, monkeypatch, capsys):
    from model.hf import importer

    monkeypatch.setattr(importer, "PROGRESS_BYTES", 0)  # every model counts as large
    to_checkpoint(exported[1], tmp_path / "back")
    assert "import: weights read" in capsys.readouterr().err
