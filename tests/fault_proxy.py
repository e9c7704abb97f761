"""A fault-injecting HTTP proxy for the storage tests: it stands in front of the GCS emulator
or the S3 server on 127.0.0.1 and forwards every request, except that a seeded share of them
fail the way object stores and networks fail:

* ``429``, ``500``, ``503`` answers with the store's own error body (S3 XML, GCS JSON), the
  request never reaching the store;
* ``reset_before``: the connection is reset before the request is forwarded;
* ``reset_after``: the request is carried out by the store and the connection is reset
  before any answer (so a retried request meets its own earlier effect);
* ``cut``: the answer's headers and half its body are sent, then the connection is reset;
* ``slow``: the answer is held back ``slow_s`` (50-300 ms; not a failure unless longer than
  the client's timeout).

``force=403`` (or 404, ...) answers every request with that status instead, for the
fail-fast tests. ``stats`` counts requests and the faults injected, by kind.

    with FaultProxy(upstream, flavor="s3", fault_rate=0.15, seed=1) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
"""

from __future__ import annotations

import collections
import http.client
import json
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("429", "500", "503", "reset_before", "reset_after", "cut")
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "trailer",
        "upgrade", "content-length", "host"}


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a client closing its connection is not news


class FaultProxy:
    def __init__(self, upstream: str, flavor: str, fault_rate: float = 0.15, slow_rate: float = 0.05,
                 seed: int = 0, faults: tuple[str, ...] = FAULTS, slow_s: tuple[float, float] = (0.05, 0.3)):
        if flavor not in ("gcs", "s3"):
            raise ValueError(f"flavor {flavor!r}: expected gcs or s3")
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.flavor = flavor
        self.fault_rate = fault_rate
        self.slow_rate = slow_rate
        self.faults = tuple(faults)
        self.slow_s = slow_s
        self.force: int | None = None
        self.stats: collections.Counter = collections.Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def injected(self) -> int:
        return sum(self.stats[k] for k in FAULTS)

    def _choose(self) -> str | None:
        with self._lock:
            self.stats["requests"] += 1
            r = self._rng.random()
            if r < self.fault_rate and self.faults:
                kind = self._rng.choice(self.faults)
            elif r < self.fault_rate + self.slow_rate:
                kind = "slow"
            else:
                kind = None
            if kind:
                self.stats[kind] += 1
            return kind

    def _error_body(self, status: int) -> tuple[bytes, str]:
        if self.flavor == "s3":
            code = {400: "InvalidRequest", 403: "AccessDenied", 404: "NoSuchBucket", 429: "SlowDown", 500: "InternalError",
                    503: "SlowDown"}.get(status, "InternalError")
            body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    f"<Message>injected by the test proxy</Message></Error>").encode()
            return body, "application/xml"
        body = json.dumps({"error": {"code": status, "message": "injected by the test proxy",
                                     "errors": [{"message": "injected", "reason": "backendError"}]}}).encode()
        return body, "application/json"

    # ------------------------------------------------------------------ the handler

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                try:
                    self.wfile.flush()
                except OSError:
                    pass
                self.connection.close()

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, declared: int | None = None):
                self.send_response_only(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if declared is None else declared))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._read_body()
                if proxy.force:
                    with proxy._lock:
                        proxy.stats["requests"] += 1
                    kind = "force"
                else:
                    kind = proxy._choose()
                if kind == "force" or kind in ("429", "500", "503"):
                    status = proxy.force if kind == "force" else int(kind)
                    err, ctype = proxy._error_body(status)
                    self._send(status, [("Content-Type", ctype)], err)
                    return
                if kind == "reset_before":
                    self._reset()
                    return
                if kind == "slow":
                    time.sleep(proxy._rng.uniform(*proxy.slow_s))
                up = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
                    up.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST")
                               else None, headers=headers)
                    resp = up.getresponse()
                    data = resp.read()
                    out_headers = []
                    declared = None
                    here, there = proxy.url.split("//")[1], headers["Host"]
                    for k, v in resp.getheaders():
                        if k.lower() == "content-length" and self.command == "HEAD":
                            declared = int(v)
                        elif k.lower() not in _HOP:
                            out_headers.append((k, v.replace(there, here) if k.lower() == "location" else v))
                    if "json" in (resp.getheader("Content-Type") or ""):
                        data = data.replace(there.encode(), here.encode())
                    status = resp.status
                finally:
                    up.close()
                if kind == "reset_after":
                    self._reset()
                    return
                if kind == "cut" and len(data) > 1 and self.command != "HEAD":
                    self.send_response_only(status)
                    for k, v in out_headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self._reset()
                    return
                self._send(status, out_headers, data, declared)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        return Handler
