"""What every request passes before a route sees it: the API key, the drain, the body size.

    app.add_middleware(Guard, state=state, metrics=metrics, routes=app.router.routes,
                       api_key="s3cret", max_request_bytes=1 << 20)

In this order, for every path but the probes ``/health`` and ``/ready``:

1. **API key** (when one is set): ``Authorization: Bearer KEY``, compared in constant time
   (``hmac.compare_digest``); missing or wrong is 401 (code ``invalid_api_key``).
2. **Drain**: once :meth:`ServeState.drain` was called (SIGTERM), new requests get 503
   (code ``shutting_down``, ``Connection: close``), ``/metrics`` excepted; the requests
   already in flight go on.
3. **Body size**: a body over ``max_request_bytes`` (by its Content-Length, or counted as
   it arrives) is 413 (code ``request_too_large``); a body within it is read here and
   handed on to the route.

It also counts every request (``mtnlg_requests_total`` by route and status, the latency
histogram) and the API requests in flight, which the drain waits for. A pure ASGI
middleware, so streamed replies pass through untouched.
"""

from __future__ import annotations

import hmac
import time

from starlette.routing import Match

from mtnlg.serve.metrics import ServeMetrics
from mtnlg.serve.protocol import error_body

PROBES = frozenset({"/health", "/ready"})
UNTRACKED = PROBES | {"/metrics"}  # not "in flight": the drain does not wait for them


class ServeState:
    """Whether the server is draining, and how many API requests it is answering."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0

    def drain(self) -> None:
        """Refuse new requests (503) from now on; those in flight finish."""
        self.draining = True


class Guard:
    def __init__(self, app, state: ServeState, metrics: ServeMetrics, routes: list, api_key: str | None = None,
                 max_request_bytes: int = 1 << 20):
        self.app, self.state, self.metrics, self.routes = app, state, metrics, routes
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = self._endpoint(scope)
        status = 500  # what a request that never answered counts as

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        tracked = path not in UNTRACKED
        t0 = time.perf_counter()
        if tracked:
            self.state.in_flight += 1
            self.metrics.in_flight.inc()
        try:
            await self._guarded(scope, receive, send_status, path)
        finally:
            if tracked:
                self.state.in_flight -= 1
                self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _guarded(self, scope, receive, send, path: str):
        if path in PROBES:
            return await self.app(scope, receive, send)
        if self.api_key is not None:
            given = _bearer(scope)
            if given is None:
                return await _refuse(send, 401, "Missing API key: send it as 'Authorization: Bearer KEY'",
                                     "invalid_api_key", {"www-authenticate": "Bearer"})
            if not hmac.compare_digest(given, self.api_key):
                return await _refuse(send, 401, "Incorrect API key provided", "invalid_api_key",
                                     {"www-authenticate": "Bearer"})
        if self.state.draining and path != "/metrics":
            return await _refuse(send, 503, "the server is shutting down; retry on another replica",
                                 "shutting_down", {"connection": "close"}, "server_error")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._body(scope, receive)
            if body is None:
                return await _refuse(send, 413, f"the request body exceeds this server's limit of "
                                                f"{self.max_request_bytes} bytes (--max-request-bytes)",
                                     "request_too_large", {"connection": "close"})
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is over the limit."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_request_bytes:
                return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(parts)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    def _endpoint(self, scope) -> str:
        """The route's path (``/v1/models/{model}``), "other" for paths no route serves."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "other"


def _bearer(scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def _replay(body: bytes, receive):
    """A ``receive`` that gives ``body`` once, then what the client sends (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def _refuse(send, status: int, message: str, code: str, headers: dict[str, str],
                  type_: str = "invalid_request_error") -> None:
    body = error_body(message, type_, None, code)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
