"""The OpenAI API's request bodies and error shape, as this server reads and writes them.

Requests are pydantic models that refuse unknown fields (a misspelt option is a 400 that
names it, not silently ignored). Errors are :class:`APIError`, answered as OpenAI does::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "context_length_exceeded"}}
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows
MAX_STOPS = 4


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error body (and ``headers``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def model_not_found(asked: str, served: str) -> APIError:
    return APIError(404, f"The model {asked!r} does not exist: this server serves {served!r}", "model",
                    "model_not_found")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat requests share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions (as in other OpenAI-compatible servers)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop: at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed when stream is true", "stream_options")
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    # a text, a list of texts, token ids, or a list of token id lists (one choice set per prompt)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo, to score the prompt
    echo: bool = False
    # report each token's log-probability and its ``logprobs`` most likely alternatives
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict:
        """``{"role", "content"}`` for the chat format (``developer`` is OpenAI's newer ``system``)."""
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's): ``prompt`` or ``messages``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # the end-of-document token that starts every prompt the server runs
    add_special_tokens: bool = True
    # messages only: end with the assistant's turn, as a chat request does
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]
