"""Conversations as token ids: the chat format shared by mid-training, SFT, RL, evals and chat.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": ...}`:

- an optional first `system` message (str), merged into the first user turn (system text, a blank
  line, then the user's text);
- then user and assistant turns alternating, starting with user; user content is a str;
- assistant content is a str or a list of parts `{"type": "text" | "python" | "python_output", "text": str}`.

Rendering (mask 1 = a token the model is trained to produce, 0 = context):

    <|bos|>                                                   0
    <|user_start|> text <|user_end|>                          0
    <|assistant_start|>                                       0
      text                                                    1
      <|python_start|> code <|python_end|>                    1
      <|output_start|> tool output <|output_end|>             0   (the engine forces these at inference)
    <|assistant_end|>                                         1

Text is encoded with `Tokenizer.encode`, so a special token's name inside a message stays plain text.
"""
from __future__ import annotations

from typing import Any

from model.errors import InputError

_PART_TOKENS = {  # part type -> (open, close, mask)
    "text": (None, None, 1),
    "python": ("<|python_start|>", "<|python_end|>", 1),
    "python_output": ("<|output_start|>", "<|output_end|>", 0),
}


def render(messages: list[dict[str, Any]], tok, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and training mask of a whole conversation, cut to the first `max_tokens` tokens."""
    turns = _turns(messages)
    ids: list[int] = [tok.bos_id]
    mask: list[int] = [0]

    def add(token_ids: list[int], m: int) -> None:
        ids.extend(token_ids)
        mask.extend([m] * len(token_ids))

    def special(name: str) -> list[int]:
        return [tok.special_id(name)]

    for i, (role, content) in enumerate(turns):
        if role == "user":
            add(special("<|user_start|>") + tok.encode(content) + special("<|user_end|>"), 0)
            continue
        add(special("<|assistant_start|>"), 0)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for j, part in enumerate(parts):
            open_, close, m = _PART_TOKENS[_part_type(part, i, j)]
            body = tok.encode(part["text"])
            add((special(open_) if open_ else []) + body + (special(close) if close else []), m)
        add(special("<|assistant_end|>"), 1)
    if max_tokens is not None:
        if max_tokens < 1:
            raise InputError(f"max_tokens must be ≥ 1 (got {max_tokens}): pass a positive token budget or None")
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(messages: list[dict[str, Any]], tok, max_tokens: int | None = None) -> list[int]:
    """The prompt that asks the model for the next assistant turn: the conversation without a trailing
    assistant message, then `<|assistant_start|>`. When it is longer than `max_tokens`, the oldest tokens
    after `<|bos|>` are dropped (the most recent turns matter most)."""
    _turns(messages)  # the whole conversation must be valid, so that what is left ends with a user turn
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = render(messages, tok)
    ids.append(tok.special_id("<|assistant_start|>"))
    if max_tokens is not None and len(ids) > max_tokens:
        if max_tokens < 2:
            raise InputError(f"max_tokens {max_tokens} cannot hold <|bos|> and <|assistant_start|>: use at least 2")
        ids = ids[:1] + ids[len(ids) - (max_tokens - 1):]
    return ids


def _turns(messages) -> list[tuple[str, Any]]:
    """Validate the roles and contents; merge the system message into the first user turn."""
    if not isinstance(messages, list) or not messages:
        raise InputError("a conversation must be a non-empty list of messages: pass [{'role': 'user', 'content': ...}]")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"message {i} must be a dict with 'role' and 'content': fix the conversation")
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise InputError(f"message {i} has unknown role {role!r}: use 'system', 'user' or 'assistant'")
        if role == "system" and i != 0:
            raise InputError(f"message {i} is a system message but only the first message may be one: move or drop it")
        if role in ("system", "user") and not isinstance(content, str):
            raise InputError(f"message {i} ({role}) content must be a string (got {type(content).__name__}): pass plain text")
        if role == "assistant" and not isinstance(content, (str, list)):
            raise InputError(f"message {i} (assistant) content must be a string or a list of parts: fix the conversation")
        turns.append((role, content))
    system = None
    if turns[0][0] == "system":
        system = turns.pop(0)[1]
        if not turns:
            raise InputError("the conversation has a system message but no user message: add a user turn")
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            n = i + (system is not None)
            raise InputError(
                f"message {n} is {role!r} but {expected!r} was expected: turns must alternate user/assistant, starting with user"
            )
    if system is not None:
        turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
    return turns


def _part_type(part, turn: int, index: int) -> str:
    if not isinstance(part, dict) or part.get("type") not in _PART_TOKENS or not isinstance(part.get("text"), str):
        raise InputError(
            f"part {index} of assistant turn {turn} must be {{'type': 'text'|'python'|'python_output', 'text': str}}: fix the part"
        )
    return part["type"]
