"""Request and response bodies of the OpenAI-compatible chat API (the subset chatforge serves).

Requests are validated here (types, ranges, size limits); the conversation's role order is checked by
`model.chat.conversation.fit_completion`. Fields OpenAI defines that chatforge does not use (top_p,
presence_penalty, user, ...) are accepted and ignored so that ordinary clients work unchanged.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MAX_NEW_TOKENS = 4096
MAX_TOP_K = 200
MAX_BODY_BYTES = 1 << 20  # a request at every limit is well under this, even with every character \u-escaped


def _content_schema(schema: dict) -> None:
    schema.pop("type", None)
    schema["anyOf"] = [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}, "required": ["type", "text"]}}]


class Message(BaseModel):
    """A chat message. `content` is a string, or a list of text parts `{"type": "text", "text": ...}`
    (joined into one string)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., json_schema_extra=_content_schema)

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> str:
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
            v = "".join(p["text"] for p in v)
        if not isinstance(v, str):
            raise ValueError("content must be a string (or a list of {'type': 'text', 'text': ...} parts)")
        if len(v) > MAX_MESSAGE_CHARS:
            raise ValueError(f"a message may hold at most {MAX_MESSAGE_CHARS} characters (this one has {len(v)})")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: the server answers with the one model it loaded.")
    messages: list[Message] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    stream: bool | None = Field(False, description="Send the reply as server-sent events (chat.completion.chunk).")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding; null = 1.")
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K, description="Sample from the k most likely tokens; 0 or null = off.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int | None = Field(1, description="Only 1 is supported.")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int:
        if v not in (None, 1):
            raise ValueError(f"only n=1 is supported (got {v})")
        return 1

    @field_validator("stream", "temperature", mode="after")
    @classmethod
    def _defaults(cls, v, info):
        return ({"stream": False, "temperature": 1.0}[info.field_name]) if v is None else v

    @model_validator(mode="after")
    def _total_size(self) -> "ChatCompletionRequest":
        total = sum(len(m.content) for m in self.messages)
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"messages: they hold {total} characters in total; the limit is {MAX_TOTAL_CHARS}")
        return self

    def token_limit(self) -> int | None:
        """The requested reply length: max_completion_tokens, else max_tokens, else None (as long as fits)."""
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatforge"
    key: str | None = Field(None, description="The artifact key of the loaded checkpoint (chatforge extension).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
