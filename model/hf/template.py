"""Tokenizer files and chat template of an exported `nanochat` model directory, and the way back.

The template renders a conversation to the same ids as `model.chat.conversation.render` (and, with
`add_generation_prompt=True`, `render_for_completion`), and marks with `{% generation %}` exactly the tokens
our training mask sets to 1, so `return_assistant_tokens_mask=True` gives `render(...)[1]`. Two known
divergences, both from transformers tokenizing one rendered string where we encode each text by itself:

- transformers splits special-token names out of any text, so a message that literally contains
  "<|user_end|>" gets the real token where our `Tokenizer.encode` keeps plain text. Passing
  `sanitize_control_tokens=True` to `apply_chat_template` restores our behaviour.
- adjacent text parts of one assistant turn are encoded separately by us but joined by the template; the ids
  agree only when the join falls on a pre-tokenizer boundary that no merge crosses ("Hello" + " world"
  agrees, "Hel" + "lo" does not). Our data never splits text parts mid-word.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from model.config import SPECIAL_TOKENS
from model.data.tokenizer import BOS, TOKENIZER_FILE, Tokenizer
from model.errors import InputError

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 reads the template from here, not tokenizer_config.json
CONFIG_FILE = "tokenizer_config.json"

# Errors mirror model.chat.conversation._turns. With add_generation_prompt a trailing assistant message is
# dropped, as render_for_completion does, so the prompt asks for that turn again rather than breaking alternation.
CHAT_TEMPLATE = r"""{%- if not messages -%}
    {{- raise_exception('a conversation must be a non-empty list of messages') -}}
{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is not string -%}
        {{- raise_exception('the system message content must be a string') -}}
    {%- endif -%}
    {%- set system = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
    {%- if not turns -%}
        {{- raise_exception('the conversation has a system message but no user message') -}}
    {%- endif -%}
{%- else -%}
    {%- set system = none -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
        {{- raise_exception('turns must alternate user/assistant, starting with user, after an optional first system message') -}}
    {%- elif message['role'] == 'user' and message['content'] is not string -%}
        {{- raise_exception('user message content must be a string') -}}
    {%- elif message['role'] == 'assistant' and message['content'] is not string -%}
        {%- if message['content'] is not sequence or message['content'] is mapping -%}
            {{- raise_exception('assistant message content must be a string or a list of parts') -}}
        {%- endif -%}
        {%- for part in message['content'] -%}
            {%- if part is not mapping or part['type'] not in ['text', 'python', 'python_output'] or part['text'] is not string -%}
                {{- raise_exception("an assistant part must be {'type': 'text'|'python'|'python_output', 'text': str}") -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and turns[-1]['role'] == 'assistant' -%}
    {%- set turns = turns[:-1] -%}
{%- endif -%}
{{- '<|bos|>' -}}
{%- for message in turns -%}
    {%- if message['role'] == 'user' -%}
        {{- '<|user_start|>' -}}
        {%- if loop.first and system is not none -%}
            {{- system + '\n\n' -}}
        {%- endif -%}
        {{- message['content'] + '<|user_end|>' -}}
    {%- else -%}
        {{- '<|assistant_start|>' -}}
        {%- if message['content'] is string -%}
            {%- generation -%}{{- message['content'] -}}{%- endgeneration -%}
        {%- else -%}
            {%- for part in message['content'] -%}
                {%- if part['type'] == 'text' -%}
                    {%- generation -%}{{- part['text'] -}}{%- endgeneration -%}
                {%- elif part['type'] == 'python' -%}
                    {%- generation -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}{%- endgeneration -%}
                {%- else -%}
                    {{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
                {%- endif -%}
            {%- endfor -%}
        {%- endif -%}
        {%- generation -%}{{- '<|assistant_end|>' -}}{%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant_start|>' -}}
{%- endif -%}
"""


def tokenizer_config(chat: bool, model_max_length: int | None = None) -> dict:
    """`tokenizer_config.json` for transformers' own tokenizers backend, so `AutoTokenizer` needs no remote code.

    Plain `tokenizer(text)` must give `tok.encode(text)`: no bos added (the chat template writes `<|bos|>`
    itself; base-model users prepend it as nanochat does), no clean-up on decode (it would eat spaces before
    punctuation). eos is the token that ends a reply for a chat model; base models only ever saw `<|bos|>` as a
    document separator. pad is `<|bos|>`, never `<|assistant_end|>`: collators that mask pad labels would
    otherwise stop a fine-tuned chat model from learning to end its turn. Left padding because the export is
    for batched generation."""
    config = {
        "tokenizer_class": "TokenizersBackend",
        "backend": "tokenizers",
        "bos_token": BOS,
        "eos_token": "<|assistant_end|>" if chat else BOS,
        "pad_token": BOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,  # the chat template's specials must stay tokens
        "padding_side": "left",
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def write_tokenizer_files(tokenizer_dir: Path, out_dir: Path, chat: bool, model_max_length: int | None = None) -> None:
    """tokenizer.json (copied unchanged: it has no post-processor, so nothing adds tokens behind our back),
    tokenizer_config.json, and for a chat model chat_template.jinja. A base model gets no template: it was never
    trained on the chat format, and without one transformers says so instead of rendering a prompt it can't
    follow. No special_tokens_map.json: transformers 5 reads the special tokens from tokenizer_config.json.
    The caller has read the tokenizer with `read_tokenizer`, which refuses one without our special tokens."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(tokenizer_dir) / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    config = tokenizer_config(chat, model_max_length)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if chat:
        (out_dir / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")


def read_tokenizer(model_dir: Path) -> Tokenizer:
    """Our Tokenizer from a model directory's tokenizer.json; refuses one that lacks our special tokens, since
    every chat and training path addresses them by name."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing: point at a directory exported by chatforge (or a tokenizer artifact)")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON or an unknown model
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path} is not a readable tokenizers file ({reason}): re-export or retrain the tokenizer") from None
    missing = [name for name in SPECIAL_TOKENS if hf.token_to_id(name) is None]
    if missing:
        raise InputError(f"{path} lacks the special tokens {', '.join(missing)}: use a tokenizer trained by chatforge's tokenizer stage")
    return Tokenizer(hf)
