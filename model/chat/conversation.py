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

# What a chat samples with unless told otherwise: `chatforge chat`, the dashboard's chat page, and the
# generation_config.json of an exported chat model.
CHAT_TEMPERATURE = 0.6
CHAT_TOP_K = 50

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
        else:
            turn_ids, turn_mask = _assistant_turn(content, tok, i)
            ids.extend(turn_ids)
            mask.extend(turn_mask)
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


def fit_completion(messages: list[dict[str, Any]], tok, context: int, max_tokens: int | None = None) -> tuple[list[int], int]:
    """(prompt, reply budget) for the next assistant turn, both inside a model context of `context` tokens:
    `len(prompt) + budget <= context`. The one budgeting rule of `chatforge chat` and `chatforge serve`.

    The reply is promised `min(max_tokens, context // 2)` tokens (`context // 4` when `max_tokens` is None):
    while the prompt leaves less room than that, the oldest user/assistant exchanges are dropped, whole (a
    system message stays, merged into the first user turn that is kept). The last user turn is never cut:
    when it (with the system message) leaves no room for even one reply token, `InputError`. The budget is
    then what the prompt leaves, at most `max_tokens` (all of it when `max_tokens` is None)."""
    if context < 2:
        raise InputError(f"a context of {context} tokens cannot hold a prompt and a reply: use a model with a longer context")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"max_tokens must be ≥ 1 (got {max_tokens}): pass a positive reply budget or None")
    _turns(messages)  # the whole conversation must be valid
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]  # user, assistant, ..., user
    # every turn after the first kept one renders to the same tokens whatever is dropped before it
    after = [0] * (len(rest) + 1)
    for i in range(len(rest) - 1, -1, -1):
        role, content = rest[i]["role"], rest[i]["content"]
        after[i] = after[i + 1] + (len(tok.encode(content)) + 2 if role == "user" else len(_assistant_turn(content, tok, i)[0]))
    reserve = min(max_tokens, context // 2) if max_tokens else max(1, context // 4)
    start = 0
    while True:
        first = render_for_completion(system + rest[start:start + 1], tok)  # <|bos|> first user turn <|assistant_start|>
        length = len(first) + after[start + 1]
        if length <= context - reserve or start == len(rest) - 1:
            break
        start += 2
    if length >= context:
        what = "the system message and the last user message need" if system else "the last user message needs"
        raise InputError(f"{what} {length} prompt tokens, but the model's context holds {context} (with at least "
                         f"one token for the reply): shorten it")
    room = context - length
    return render_for_completion(system + rest[start:], tok), min(max_tokens or room, room)


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


def _assistant_turn(content, tok, turn: int) -> tuple[list[int], list[int]]:
    """Token ids and mask of one assistant turn, `<|assistant_start|>` to `<|assistant_end|>`."""
    ids, mask = [tok.special_id("<|assistant_start|>")], [0]
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    for j, part in enumerate(parts):
        open_, close, m = _PART_TOKENS[_part_type(part, turn, j)]
        piece = ([tok.special_id(open_)] if open_ else []) + tok.encode(part["text"]) + ([tok.special_id(close)] if close else [])
        ids.extend(piece)
        mask.extend([m] * len(piece))
    ids.append(tok.special_id("<|assistant_end|>"))
    mask.append(1)
    return ids, mask


def _part_type(part, turn: int, index: int) -> str:
    if not isinstance(part, dict) or part.get("type") not in _PART_TOKENS or not isinstance(part.get("text"), str):
        raise InputError(
            f"part {index} of assistant turn {turn} must be {{'type': 'text'|'python'|'python_output', 'text': str}}: fix the part"
        )
    return part["type"]


def validate(messages) -> None:
    """Raise InputError (one line) unless `messages` is a conversation in the schema above whose assistant
    turns are all non-empty: an assistant turn that is an empty (or whitespace-only) string, has no parts,
    or only text parts that are empty is refused, as is a malformed part."""
    _turns(messages)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        types = [_part_type(part, i, j) for j, part in enumerate(parts)]
        if all(t == "text" for t in types) and not any(part["text"].strip() for part in parts):
            raise InputError(f"message {i} is an empty assistant turn: give every assistant turn some text (or drop the turn)")
