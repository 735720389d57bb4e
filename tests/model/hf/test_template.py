"""The exported tokenizer files, as transformers loads them, agree with our Tokenizer and chat renderer."""
from __future__ import annotations

import json
import re

import pytest

transformers = pytest.importorskip("transformers")
from helpers import small_bpe
from jinja2.exceptions import TemplateError  # a transformers dependency

from model.chat.conversation import render, render_for_completion
from model.errors import InputError
from model.hf.template import CHAT_TEMPLATE, read_tokenizer, write_tokenizer_files

CORPUS = ("Hello world! hello there, this is some text. print(1 + 2) returns 3.\n"
          "Café au lait, naïve 日本語 テキスト 🙂 emoji. def f(x): return x * 2\n\tindented  spaces   here")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(our tokenizer, its artifact dir, HF chat tokenizer, HF base tokenizer, chat export dir)."""
    root = tmp_path_factory.mktemp("hf_tok")
    tok = small_bpe(CORPUS, 400)
    (root / "tok").mkdir()
    tok._hf.save(str(root / "tok" / "tokenizer.json"))
    write_tokenizer_files(root / "tok", root / "chat", chat=True, model_max_length=256)
    write_tokenizer_files(root / "tok", root / "base", chat=False)
    load = transformers.AutoTokenizer.from_pretrained
    return tok, root / "tok", load(root / "chat"), load(root / "base"), root / "chat"


SYSTEM = {"role": "system", "content": "You are terse."}
PARTS = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "print(1 + 2)"},
         {"type": "python_output", "text": "3\n"}, {"type": "text", "text": " It is 3."}]
CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "Hello world!"}],
    "system": [SYSTEM, {"role": "user", "content": "hello there"}],
    "multi_turn": [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "this is some text."},
                   {"role": "user", "content": "ok"}],
    "tool_parts": [{"role": "user", "content": "what is 1 + 2?"}, {"role": "assistant", "content": PARTS},
                   {"role": "user", "content": "thanks"}],
    "python_only": [{"role": "user", "content": "run"},
                    {"role": "assistant", "content": [{"type": "python", "text": "def f(x): return x * 2"}]},
                    {"role": "user", "content": "and?"}],
    "unicode": [{"role": "system", "content": "Café 🙂"}, {"role": "user", "content": "naïve 日本語 テキスト\n\tx  "},
                {"role": "assistant", "content": [{"type": "text", "text": "🙂 emoji"}]}, {"role": "user", "content": "  "}],
    "empty_ish": [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                  {"role": "assistant", "content": [{"type": "python", "text": ""}, {"type": "python_output", "text": ""}]},
                  {"role": "user", "content": "\n"}],
    "ends_with_assistant": [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": PARTS}],
    "ends_with_str_assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " Hello world"}],
}


def ids(hf, messages, **kw) -> list[int]:
    return hf.apply_chat_template(messages, return_dict=False, **kw)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_template_matches_our_renderer(exported, name):
    tok, _, hf, _, _ = exported
    messages = CONVERSATIONS[name]
    assert ids(hf, messages, add_generation_prompt=True) == render_for_completion(messages, tok)
    full, mask = render(messages, tok)
    assert ids(hf, messages) == full
    out = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == full and out["assistant_masks"] == mask
    if messages[-1]["role"] == "assistant" and isinstance(messages[-1]["content"], str):
        # prefilling a reply: the open turn, without <|assistant_end|>
        assert ids(hf, messages, continue_final_message=True) == full[:-1]


@pytest.mark.parametrize("messages, error", [
    ([], "empty conversation"),  # transformers refuses this one itself, with a ValueError
    ([SYSTEM], "no user message"),
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": "a"}, SYSTEM], "alternate"),
    ([{"role": "tool", "content": "a"}], "alternate"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "user message content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "part"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}], "part"),
])
def test_template_refuses_what_our_renderer_refuses(exported, messages, error):
    tok, _, hf, _, _ = exported
    with pytest.raises(InputError):
        render(messages, tok)
    for prompt in (False, True):  # a trailing assistant turn is checked even where the prompt drops it
        with pytest.raises((TemplateError, ValueError), match=error):
            hf.apply_chat_template(messages, add_generation_prompt=prompt)


TEXTS = ["Hello world!", "", " leading and trailing ", "naïve 日本語 🙂\n\n\ttabs", "12345678 digits", "a\r\nb"]


@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_encodes_and_decodes_like_ours(exported, text):
    tok, _, hf, base, _ = exported
    for t in (hf, base):
        assert t(text)["input_ids"] == tok.encode(text)  # no <|bos|> or eos added
        assert t.decode(tok.encode(text)) == text
    structured = render(CONVERSATIONS["tool_parts"], tok)[0]
    assert hf.decode(structured) == tok.decode(structured)  # specials shown by name, like ours


def test_special_tokens_chat_and_base(exported):
    tok, _, hf, base, chat_dir = exported
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.special_id("<|assistant_end|>"), tok.bos_id)
    assert (base.bos_token_id, base.eos_token_id, base.pad_token_id) == (tok.bos_id,) * 3
    assert hf.model_max_length == 256 and hf.padding_side == "left"
    assert hf.chat_template == CHAT_TEMPLATE and base.chat_template is None
    config = json.loads((chat_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and not (chat_dir / "special_tokens_map.json").exists()
    # a batch is padded on the left with <|bos|>, and the template's own <|bos|> is not doubled
    convs = [CONVERSATIONS["one_user"], CONVERSATIONS["system"]]
    want = [render_for_completion(c, tok) for c in convs]
    batch = hf.apply_chat_template(convs, add_generation_prompt=True, padding=True, return_dict=True)
    width = max(map(len, want))
    assert batch["input_ids"] == [[tok.bos_id] * (width - len(w)) + w for w in want]
    assert batch["attention_mask"] == [[0] * (width - len(w)) + [1] * len(w) for w in want]


def test_exported_tokenizer_json_is_the_artifact_file(exported):
    tok, tok_dir, _, _, chat_dir = exported
    assert (chat_dir / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    back = read_tokenizer(chat_dir)
    assert back.encode(CORPUS) == tok.encode(CORPUS) and back.encode("<|user_end|>") == tok.encode("<|user_end|>")


def test_known_divergences(exported):
    """Documented in model/hf/template.py: specials named in text, and text parts joined mid-word."""
    tok, _, hf, _, _ = exported
    tricky = [{"role": "user", "content": "say <|user_end|> please"}]
    assert ids(hf, tricky, add_generation_prompt=True) != render_for_completion(tricky, tok)
    assert ids(hf, tricky, add_generation_prompt=True, sanitize_control_tokens=True) == render_for_completion(tricky, tok)

    def turn(*texts):
        return [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "text", "text": t} for t in texts]}]
    assert ids(hf, turn("Hello", " world")) == render(turn("Hello", " world"), tok)[0]  # a pre-tokenizer boundary
    assert len(tok.encode("Hello")) == 1  # so the mid-word join below is a merge our encoding cannot make
    assert ids(hf, turn("Hel", "lo")) != render(turn("Hel", "lo"), tok)[0]


def test_read_tokenizer_errors(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'tokenizer.json'} is missing")):
        read_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="not a readable tokenizers file"):
        read_tokenizer(tmp_path)
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.BPE())
    bare.add_special_tokens(["<|bos|>", "<|user_start|>"])
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(InputError, match=r"lacks the special tokens <\|user_end\|>, <\|assistant_start\|>, .*<\|output_end\|>:"):
        read_tokenizer(tmp_path)


def test_text_generation_pipeline_runs(exported):
    """transformers' own chat path (pipeline → template → generate) works with these files and a nanochat model."""
    torch = pytest.importorskip("torch")
    tok, _, hf, _, _ = exported
    config = transformers.NanoChatConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_id,
                                         eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id)
    torch.manual_seed(0)
    model = transformers.NanoChatForCausalLM(config).eval()
    chat = transformers.pipeline("text-generation", model=model, tokenizer=hf, device="cpu")
    out = chat([CONVERSATIONS["one_user"], CONVERSATIONS["tool_parts"]], max_new_tokens=4, do_sample=False, batch_size=2)
    assert [o[0]["generated_text"][-1]["role"] for o in out] == ["assistant", "assistant"]
