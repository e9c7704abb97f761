"""The OpenAI-compatible HTTP API over an :class:`~mtnlg.serve.engine.Engine` (FastAPI).

    app = create_app(engine, model_name="gpt-local", api_key="s3cret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes (the part of the OpenAI API that text applications use, and vLLM's tokenizer routes):

* ``GET  /v1/models``, ``GET /v1/models/{model}``: the one model served, ``max_model_len``;
* ``POST /v1/completions``: ``prompt`` (a text, texts, token ids or lists of them),
  ``max_tokens`` (default 16), ``temperature`` (default 1), ``top_p``, ``n``, ``stop``,
  ``seed``, ``echo``, ``logprobs`` (0-20), ``stream``, ``stream_options``; ``min_tokens`` and
  ``repetition_penalty`` as extensions; ``echo`` with ``logprobs`` reports the prompt's
  tokens too (:mod:`.scoring`), and ``max_tokens: 0`` with ``echo`` scores a prompt;
* ``POST /v1/chat/completions``: ``messages`` (system/developer/user/assistant),
  ``max_completion_tokens`` or ``max_tokens`` (default: what fits, at most 256),
  ``logprobs`` + ``top_logprobs``, the same sampling fields; the prompt is the chat format
  of :mod:`mtnlg.generate.chat` (its ``CHAT_TEMPLATE``), the reply cut at the next turn;
* ``POST /tokenize`` (``prompt`` or ``messages``), ``POST /detokenize`` (``tokens``);
* ``GET /health`` (alive, with the engine's counters), ``GET /ready`` (serving and not
  draining), ``GET /metrics`` (Prometheus).

``n`` choices are ``n`` engine requests queued together (all or none); with a ``seed``,
choice ``i`` samples with ``seed + i``. Errors use OpenAI's shape (:mod:`.protocol`); the
API key, the drain and the body limit are checked before any route (:mod:`.guard`).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from mtnlg.generate.chat import TURN_STARTS, format_chat
from mtnlg.model.decode import prompt_ids_for
from mtnlg.model.sampling import SamplingConfig
from mtnlg.serve import responses as R
from mtnlg.serve.engine import Engine, EngineClosed, QueueFull
from mtnlg.serve.engine import Request as EngineRequest
from mtnlg.serve.guard import Guard, ServeState
from mtnlg.serve.metrics import ServeMetrics
from mtnlg.serve.protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                  SamplingFields, model_not_found)
from mtnlg.serve.scoring import PromptScorer

CHAT_DEFAULT_MAX_TOKENS = 256
RETRY_AFTER_S = 1  # what a 429 tells the client to wait


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_model_len: int | None = None,
               max_request_bytes: int = 1 << 20, default_chat_max_tokens: int = CHAT_DEFAULT_MAX_TOKENS) -> FastAPI:
    tok = engine.tokenizer
    if max_model_len is not None and not 2 <= max_model_len <= engine.window:
        raise ValueError(f"max_model_len={max_model_len} must be between 2 and the model's context of "
                         f"{engine.window} tokens")
    limit = max_model_len or engine.window
    created = int(time.time())
    scorer = PromptScorer(engine.model, tok)
    state, metrics = ServeState(), ServeMetrics(queue_depth=lambda: engine.waiting,
                                                occupancy=lambda: engine.occupancy)

    app = FastAPI(title="mtnlg", summary="OpenAI-compatible API for an mtnlg GPT", version="1")
    app.state.serving, app.state.metrics, app.state.engine = state, metrics, engine
    app.add_middleware(Guard, state=state, metrics=metrics, routes=app.router.routes, api_key=api_key,
                       max_request_bytes=max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # logged by the server as well
        return await _api_error(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}", None,
                                                  "internal_error", "server_error"))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        msg = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return await _api_error(request, APIError(exc.status_code, msg))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        msg = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid value")
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        return await _api_error(request, APIError(400, f"{where}: {msg}{more}", where, "invalid_value"))

    # ------------------------------------------------------------------ checks

    def check_model(asked: str | None) -> None:
        if asked is not None and asked != model_name:
            raise model_not_found(asked, model_name)

    def fit(ids: list[int], asked: int | None, default: int, param: str, prompt_param: str) -> int:
        """The new tokens a request gets: ``asked``, or ``default`` cut to what fits."""
        which = (f"This model's maximum context length is {limit} tokens" if limit == engine.window else
                 f"This server's maximum context length is {limit} tokens (--max-model-len; the model's is "
                 f"{engine.window})")
        if len(ids) > limit or (len(ids) == limit and asked != 0):  # max_tokens 0: a whole window is scored
            raise APIError(400, f"{which}; the prompt alone has {len(ids)}.", prompt_param, "context_length_exceeded")
        if asked is None:
            return min(default, limit - len(ids))
        if len(ids) + asked > limit:
            raise APIError(400, f"{which}. However, you requested {len(ids) + asked} tokens ({len(ids)} in the "
                                f"prompt, {asked} for the completion).", param, "context_length_exceeded")
        return asked

    def sampling(req: SamplingFields, max_tokens: int, choice: int) -> SamplingConfig:
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens={req.min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
        return SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=None if req.seed is None else req.seed + choice, min_new_tokens=req.min_tokens,
                              repetition_penalty=req.repetition_penalty)

    def check_count(choices: int) -> None:
        if choices > engine.config.max_queue:
            raise APIError(400, f"n: {choices} choices exceed this server's queue of {engine.config.max_queue} "
                                f"(--max-queue)", "n")

    def chat_ids(messages, add_generation_prompt: bool = True) -> list[int]:
        if not messages:
            raise APIError(400, "messages: must hold at least one message", "messages")
        turns = [m.as_dict() for m in messages]
        if not any(t["content"].strip() for t in turns):
            raise APIError(400, "messages: every message is empty", "messages")
        return prompt_ids_for(tok, format_chat(turns, add_generation_prompt))

    def token_prompt(ids: list[int], param: str) -> list[int]:
        bad = [i for i in ids if not 0 <= i < tok.vocab_size]
        if not ids or bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary (size {tok.vocab_size})"
                           if bad else f"{param}: must not be empty", param)
        return list(ids)

    # ------------------------------------------------------------------ running

    async def start(jobs: list[tuple[list[int], SamplingConfig, list[str], int | None]]):
        """Queue the jobs (all or none); returns their engine requests and a merged event iterator."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = [EngineRequest(ids, s, lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev)),
                              stops, lp) for i, (ids, s, stops, lp) in enumerate(jobs)]
        try:
            engine.submit_many(reqs)
        except QueueFull as e:
            raise APIError(429, str(e), None, "queue_full", "rate_limit_error",
                           {"retry-after": str(RETRY_AFTER_S)}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), None, "shutting_down", "server_error") from None

        async def merged():
            left = len(reqs)
            try:
                while left:
                    i, ev = await events.get()
                    yield i, ev[0], ev[1]
                    left -= ev[0] in ("done", "error")
            finally:
                for r in reqs:
                    r.cancel()  # a no-op once done; stops decoding if the client went away
        return reqs, merged()

    def account(endpoint: str, arrived: float, reqs, prompt_tokens: int, done: dict[int, dict]) -> int:
        """Count a finished call's tokens and time to first token; returns its completion tokens."""
        completion = sum(d["completion_tokens"] for d in done.values())
        metrics.prompt_tokens.labels(endpoint).inc(prompt_tokens)
        metrics.completion_tokens.labels(endpoint).inc(completion)
        firsts = [r.first_token_at for r in reqs if r.first_token_at is not None]
        if firsts:
            metrics.ttft.labels(endpoint).observe(min(firsts) - arrived)
        return completion

    async def collect(events) -> tuple[dict, dict, dict]:
        texts: dict[int, list[str]] = {}
        tokens: dict[int, list] = {}
        done: dict[int, dict] = {}
        async for i, kind, payload in events:
            if kind == "text":
                texts.setdefault(i, []).append(payload.text)
                tokens.setdefault(i, []).extend(payload.tokens)
            elif kind == "error":
                raise APIError(500, f"generation failed: {payload}", None, "generation_failed", "server_error")
            else:
                done[i] = payload
        return {i: "".join(t) for i, t in texts.items()}, tokens, done

    def stream(body) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream")

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "draining": state.draining, "waiting": engine.waiting,
                **engine.stats.as_dict()}

    @app.get("/ready")
    async def ready():
        if state.draining or not engine.running:
            return JSONResponse({"status": "draining" if state.draining else "not ready"}, status_code=503)
        return {"status": "ready", "model": model_name}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mtnlg", "max_model_len": limit}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        check_model(model)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", "prompt")
        if req.prompt is not None:
            ids = prompt_ids_for(tok, req.prompt)
        else:
            ids = chat_ids(req.messages, req.add_generation_prompt)
        ids = ids if req.add_special_tokens else ids[1:]
        return {"tokens": ids, "count": len(ids), "max_model_len": limit}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        return {"prompt": tok.decode(token_prompt(req.tokens, "tokens")) if req.tokens else ""}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        arrived = time.perf_counter()
        check_model(req.model)
        include_usage = req.include_usage()
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 is only allowed with echo (to score the prompt)", "max_tokens")
        raw = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        if not raw:
            raise APIError(400, "prompt: must not be empty", "prompt")
        check_count(len(raw) * req.n)
        prompts: list[tuple[list[int], str]] = []
        for p in raw:
            if isinstance(p, str):
                if not p.strip():
                    raise APIError(400, "prompt: must not be empty", "prompt")
                prompts.append((prompt_ids_for(tok, p), p))
            else:
                ids = token_prompt(p, "prompt")
                prompts.append((ids, tok.decode(ids)))
        stops = req.stops()
        jobs = []
        for ids, _ in prompts:
            max_tokens = fit(ids, req.max_tokens, 16, "max_tokens", "prompt")
            jobs += [(ids, sampling(req, max_tokens, j), stops, req.logprobs) for j in range(req.n)]
        scored = []  # per prompt, echoed with logprobs: its own tokens' logprobs (a pass beside the engine)
        for ids, _ in prompts:
            scored.append(R.prompt_logprobs(*await asyncio.to_thread(scorer, ids, req.logprobs))
                          if req.echo and req.logprobs is not None else None)
        reqs, events = await start(jobs)
        echoes = [text if req.echo else "" for _, text in prompts for _ in range(req.n)]
        echo_logprobs = [lp for lp in scored for _ in range(req.n)]
        prompt_tokens = sum(len(ids) for ids, _ in prompts)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(i: int, tokens, with_echo: bool = False) -> dict | None:
            if req.logprobs is None:
                return None
            own = R.completion_logprobs(tokens, len(echoes[i]))
            return R.joined_logprobs(echo_logprobs[i], own) if with_echo and echo_logprobs[i] else own

        if req.stream:
            def chunk(choice: dict) -> str:
                return R.sse(R.envelope(rid, "text_completion", now, model_name, [choice], None, include_usage))

            async def body():
                done: dict[int, dict] = {}
                for i, echo in enumerate(echoes):
                    if echo or echo_logprobs[i]:
                        yield chunk(R.completion_choice(i, echo, None, echo_logprobs[i]))
                async for i, kind, payload in events:
                    if kind == "text":
                        yield chunk(R.completion_choice(i, payload.text, None, logprobs(i, payload.tokens)))
                    elif kind == "error":
                        yield R.sse({"error": {"message": payload, "type": "server_error"}})
                    else:
                        done[i] = payload
                        yield chunk(R.completion_choice(i, "", payload["finish_reason"]))
                completion = account("/v1/completions", arrived, reqs, prompt_tokens, done)
                if include_usage:
                    yield R.sse(R.envelope(rid, "text_completion", now, model_name, [],
                                           R.usage(prompt_tokens, completion)))
                yield R.DONE
            return stream(body())

        texts, tokens, done = await collect(events)
        completion = account("/v1/completions", arrived, reqs, prompt_tokens, done)
        choices = [R.completion_choice(i, echoes[i] + texts.get(i, ""), done[i]["finish_reason"],
                                       logprobs(i, tokens.get(i, []), True)) for i in range(len(jobs))]
        return R.envelope(rid, "text_completion", now, model_name, choices, R.usage(prompt_tokens, completion))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        arrived = time.perf_counter()
        check_model(req.model)
        include_usage = req.include_usage()
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs to be true", "top_logprobs")
        check_count(req.n)
        ids = chat_ids(req.messages)
        asked, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                        else (req.max_tokens, "max_tokens"))
        max_tokens = fit(ids, asked, default_chat_max_tokens, param, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        stops = list(TURN_STARTS) + req.stops()
        reqs, events = await start([(ids, sampling(req, max_tokens, j), stops, top) for j in range(req.n)])
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(tokens) -> dict | None:
            return R.chat_logprobs(tokens) if req.logprobs else None

        if req.stream:
            def chunk(choice: dict) -> str:
                return R.sse(R.envelope(rid, "chat.completion.chunk", now, model_name, [choice], None, include_usage))

            async def body():
                done: dict[int, dict] = {}
                started = [False] * req.n
                for i in range(req.n):
                    yield chunk(R.chat_choice(i, {"role": "assistant", "content": ""}, None, key="delta"))
                async for i, kind, payload in events:
                    if kind == "text":
                        text = payload.text
                        if not started[i]:  # the reply starts after "Assistant:" and its space
                            text = text.lstrip()
                            started[i] = bool(text)
                        if text or payload.tokens:
                            yield chunk(R.chat_choice(i, {"content": text}, None, logprobs(payload.tokens), "delta"))
                    elif kind == "error":
                        yield R.sse({"error": {"message": payload, "type": "server_error"}})
                    else:
                        done[i] = payload
                        yield chunk(R.chat_choice(i, {}, payload["finish_reason"], key="delta"))
                completion = account("/v1/chat/completions", arrived, reqs, len(ids), done)
                if include_usage:
                    yield R.sse(R.envelope(rid, "chat.completion.chunk", now, model_name, [],
                                           R.usage(len(ids), completion)))
                yield R.DONE
            return stream(body())

        texts, tokens, done = await collect(events)
        completion = account("/v1/chat/completions", arrived, reqs, len(ids), done)
        choices = [R.chat_choice(i, {"role": "assistant", "content": texts.get(i, "").strip()},
                                 done[i]["finish_reason"], logprobs(tokens.get(i, []))) for i in range(req.n)]
        return R.envelope(rid, "chat.completion", now, model_name, choices, R.usage(len(ids), completion))

    return app

