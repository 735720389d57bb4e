"""Turn a stream of token ids into a stream of text, never splitting a UTF-8 character.

A byte-level BPE token may hold part of a multi-byte character (an emoji often spans 2-4 tokens);
decoding token by token would print U+FFFD for each piece. `TextStream` keeps the raw bytes of an
incomplete character until the rest arrives, so what it has returned in total, after `flush`, equals
`tok.decode` of the same (non-special) tokens.
"""
from __future__ import annotations

import codecs


class TextStream:
    """`push(token_id)` returns the text completed by that token ("" while a character is incomplete);
    special tokens produce no text. `flush()` returns what is left (an incomplete character as U+FFFD)."""

    def __init__(self, tok):
        self._tok = tok
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tok.token_bytes(int(token_id)))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
