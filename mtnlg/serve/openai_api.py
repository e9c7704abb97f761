"""The OpenAI-compatible HTTP API over an :class:`~mtnlg.serve.engine.Engine` (FastAPI).

    app = create_app(engine, model_name="gpt-local")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes (the subset of the OpenAI API that text applications use):

* ``GET  /v1/models``: the one model served;
* ``POST /v1/completions``: ``prompt`` (a string, or a list of one string), ``max_tokens``
  (default 16), ``temperature`` (default 1), ``top_p``, ``stop``, ``seed``, ``echo``,
  ``stream``; ``min_tokens`` and ``repetition_penalty`` as extensions;
* ``POST /v1/chat/completions``: ``messages`` (system/user/assistant), ``max_tokens`` or
  ``max_completion_tokens`` (default: what fits, at most 256), the same sampling fields;
  the reply is the model's continuation of the transcript of :func:`format_chat`, cut at
  the next turn;
* ``GET  /health``: 200 and the engine's counters while serving, 503 while shutting down.

``stream: true`` answers with server-sent events (``data: {chunk}`` lines, then
``data: [DONE]``). Errors use OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad request (unknown model or field, wrong type, empty prompt, more
tokens than the context holds), 429 when the queue is full, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mtnlg.generate.chat import TURN_STARTS, format_chat
from mtnlg.model.decode import prompt_ids_for
from mtnlg.model.sampling import SamplingConfig
from mtnlg.serve.engine import Engine, EngineClosed, QueueFull

CHAT_DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions (as in other OpenAI-compatible servers)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise APIError(400, f"stop: at most 4 sequences, got {len(stops)}", "stop")
    return [s for s in stops if s]


def create_app(engine: Engine, model_name: str, default_chat_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS) -> FastAPI:
    tok = engine.tokenizer
    window = engine.window
    created = int(time.time())

    app = FastAPI(title="mtnlg", summary="OpenAI-compatible API for an mtnlg GPT", version="1")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        msg = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field"
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return APIError(400, f"{where}: {msg}{more}", where, "invalid_value").response()

    def _check_common(req: _Sampling) -> None:
        if req.model != model_name:
            raise APIError(400, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           "model", "model_not_found")
        if req.n != 1:
            raise APIError(400, f"n: only n=1 is supported, got {req.n}", "n")

    def _sampling(req: _Sampling, max_tokens: int) -> SamplingConfig:
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens={req.min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
        return SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, min_new_tokens=req.min_tokens,
                              repetition_penalty=req.repetition_penalty)

    def _fit(prompt_ids: list[int], max_tokens: int | None, default: int, param: str, prompt_param: str) -> int:
        room = window - len(prompt_ids)
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {window} tokens; the prompt alone has "
                                f"{len(prompt_ids)}.", prompt_param, "context_length_exceeded")
        if max_tokens is None:
            return min(default, room)
        if len(prompt_ids) + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                                f"{max_tokens} for the completion).", param, "context_length_exceeded")
        return max_tokens

    async def _run(prompt_ids: list[int], sampling: SamplingConfig, stops: list[str]):
        """Submit to the engine; an async iterator of engine events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = engine.submit(prompt_ids, sampling, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                                   stops)
        except QueueFull as e:
            raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
        except EngineClosed as e:
            raise APIError(503, str(e), None, "shutting_down", "server_error") from None

        async def gen():
            try:
                while True:
                    ev = await events.get()
                    yield ev
                    if ev[0] in ("done", "error"):
                        return
            finally:
                handle.cancel()  # a no-op once done; stops decoding if the client went away
        return gen()

    def _usage(info: dict) -> dict:
        p, c = info["prompt_tokens"], info["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.get("/health")
    async def health():
        if engine.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "model": model_name, "waiting": engine.waiting, **engine.stats.as_dict()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mtnlg", "max_model_len": window}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        _check_common(req)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, got a list of {len(prompt)}", "prompt")
            prompt = prompt[0]
        if not prompt.strip():
            raise APIError(400, "prompt: must not be empty", "prompt")
        ids = prompt_ids_for(tok, prompt)
        max_tokens = _fit(ids, req.max_tokens, 16, "max_tokens", "prompt")
        events = await _run(ids, _sampling(req, max_tokens), _stops(req.stop))
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None, usage: dict | None = None) -> dict:
            return _envelope(rid, "text_completion", now, model_name, {"text": text}, finish, usage)

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def body():
                if req.echo:
                    yield _sse(chunk(prompt, None))
                async for kind, payload in events:
                    if kind == "text":
                        yield _sse(chunk(payload, None))
                    elif kind == "error":
                        yield _sse({"error": {"message": payload, "type": "server_error"}})
                    else:
                        yield _sse(chunk("", payload["finish_reason"], _usage(payload) if include_usage else None))
                yield "data: [DONE]\n\n"
            return StreamingResponse(body(), media_type="text/event-stream")

        text, info = await _collect(events)
        return chunk((prompt if req.echo else "") + text, info["finish_reason"], _usage(info))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        _check_common(req)
        if not req.messages:
            raise APIError(400, "messages: must hold at least one message", "messages")
        if not any(m.content.strip() for m in req.messages):
            raise APIError(400, "messages: every message is empty", "messages")
        ids = prompt_ids_for(tok, format_chat([{"role": m.role, "content": m.content} for m in req.messages]))
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = _fit(ids, asked, default_chat_max_tokens,
                          "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
                          "messages")
        events = await _run(ids, _sampling(req, max_tokens), list(TURN_STARTS) + _stops(req.stop))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: str | None, usage: dict | None = None) -> dict:
            return _envelope(rid, "chat.completion.chunk", now, model_name, {"delta": delta}, finish, usage)

        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def body():
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
                started = False
                async for kind, payload in events:
                    if kind == "text":
                        if not started:  # the reply starts after "Assistant:" and its space
                            payload = payload.lstrip()
                            started = bool(payload)
                        if payload:
                            yield _sse(chunk({"content": payload}, None))
                    elif kind == "error":
                        yield _sse({"error": {"message": payload, "type": "server_error"}})
                    else:
                        yield _sse(chunk({}, payload["finish_reason"], _usage(payload) if include_usage else None))
                yield "data: [DONE]\n\n"
            return StreamingResponse(body(), media_type="text/event-stream")

        text, info = await _collect(events)
        return _envelope(rid, "chat.completion", now, model_name,
                         {"message": {"role": "assistant", "content": text.strip()}}, info["finish_reason"],
                         _usage(info))

    return app


def _envelope(rid: str, obj: str, created: int, model: str, choice: dict, finish: str | None,
              usage: dict | None = None) -> dict:
    """One response or stream chunk in OpenAI's shape, with its single choice."""
    out = {"id": rid, "object": obj, "created": created, "model": model,
           "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        out["usage"] = usage
    return out


async def _collect(events) -> tuple[str, dict]:
    parts: list[str] = []
    async for kind, payload in events:
        if kind == "text":
            parts.append(payload)
        elif kind == "error":
            raise APIError(500, f"generation failed: {payload}", None, "generation_failed", "server_error")
        else:
            return "".join(parts), payload
    raise APIError(500, "generation ended without a result", None, None, "server_error")

