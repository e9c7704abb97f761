"""Training progress posted to Kubeflow Trainer, shown in the TrainJob's ``status.trainerStatus``.

Kubeflow Trainer (v2.2 and later, with the controller's ``TrainJobStatus`` feature gate) gives
every trainer container of a TrainJob three variables (its ``TrainJobStatus`` runtime plugin,
``pkg/runtime/framework/plugins/trainjobstatus``; user guide ``docs/user-guides/trainjob-progress.md``):

``KUBEFLOW_TRAINER_SERVER_URL``
    the HTTPS address to POST to, path included:
    ``https://<controller service>:<port>/apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/<name>/status``
``KUBEFLOW_TRAINER_SERVER_CA_CERT``
    the file of the CA that signs the controller's serving certificate (a projected ConfigMap;
    the controller's certificates rotate, so the file is read again before every post)
``KUBEFLOW_TRAINER_SERVER_TOKEN``
    the file of a projected service-account JWT whose audience names this TrainJob (it expires
    after an hour and the kubelet replaces it: read again before every post, never cached)

The request is ``POST`` with ``Authorization: Bearer <token>`` and a JSON
``UpdateTrainJobStatusRequest`` body (``pkg/apis/trainer/v1alpha1/trainjob_types.go``)::

    {"trainerStatus": {"progressPercentage": 33,             # int32, 0..100
                       "estimatedRemainingSeconds": 120,     # int32, >= 0
                       "metrics": [{"name": "loss", "value": "4.88"}, ...],   # strings, 1..64 chars, <= 256
                       "lastUpdatedTime": "2026-12-06T03:00:00Z"}}           # required (CEL rule)

The server (``pkg/statusserver/server.go``) answers 200 with the payload, or a Kubernetes
``Status`` (403 for a token it does not accept, 422 for an invalid body, 404 for an unknown
TrainJob). The guide asks clients to post at most every 5 seconds and never to let reporting
disturb training.

:class:`ProgressReporter` does that from a background thread: the training loop hands it the
latest :class:`TrainProgress` with :meth:`~ProgressReporter.offer` (a lock and a clock read,
nothing more); when 5 s have passed since the last post began and none is in flight, the
thread posts it. :meth:`~ProgressReporter.close` posts the final state whatever the interval
(as the Kubeflow SDK and the Transformers callback force their last update) and waits for it a
bounded time. A failed post (refused connection, timeout, TLS, a non-200 answer) is logged as
a warning the first time, then at most every 5 minutes, and training goes on.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping
from urllib.parse import urlsplit

from mtnlg.progress import get_logger

log = get_logger("mtnlg.train.platform")

ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_CA_CERT = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"

MIN_INTERVAL_S = 5.0     # the guide's client-side limit
POST_TIMEOUT_S = 5.0     # connect, TLS handshake and each read
WARN_EVERY_S = 300.0     # repeated failures: one warning per this many seconds
_INT32_MAX = 2**31 - 1
_MAX_VALUE_CHARS = 64    # Metric.name and Metric.value: MaxLength=64
_MAX_METRICS = 256


def percent_done(step: int, total_steps: int) -> int:
    """Whole percent of ``total_steps`` done, rounded down (100 only once all are done)."""
    if total_steps <= 0:
        return 100
    return max(0, min(100, (100 * step) // total_steps))


def _metric_value(v: float | int) -> str:
    """Ints as they are; floats as the shortest text that reads back as the same float
    (what ``log.jsonl`` holds), so a reader can compare them exactly."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else repr(float(v))


@dataclass(frozen=True)
class TrainProgress:
    """Where the run is: the step reached, the ETA (None when unknown) and named metrics
    (None or non-finite values are left out), observed at ``observed`` (UTC)."""

    step: int
    total_steps: int
    eta_s: float | None
    metrics: Mapping[str, float | int | None]
    observed: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def body(self) -> dict:
        """The ``UpdateTrainJobStatusRequest`` JSON object."""
        status: dict = {"progressPercentage": percent_done(self.step, self.total_steps)}
        if self.eta_s is not None and math.isfinite(self.eta_s):
            status["estimatedRemainingSeconds"] = max(0, min(_INT32_MAX, round(self.eta_s)))
        items = [{"name": name, "value": _metric_value(v)} for name, v in self.metrics.items()
                 if v is not None and math.isfinite(v)]
        items = [m for m in items if len(m["name"]) <= _MAX_VALUE_CHARS and len(m["value"]) <= _MAX_VALUE_CHARS]
        if items:
            status["metrics"] = items[:_MAX_METRICS]
        # metav1.Time's own form: RFC 3339 in UTC, whole seconds.
        status["lastUpdatedTime"] = self.observed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"trainerStatus": status}


@dataclass(frozen=True)
class Endpoint:
    """Where and how to post: the URL and the two files the controller mounts."""

    url: str
    ca_file: str
    token_file: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Endpoint | None:
        """The endpoint the TrainJob's variables name, or None when they are absent (not a
        TrainJob, or the controller's TrainJobStatus gate is off). All three are needed, and
        the URL must be https: the token is not sent in the clear."""
        env = os.environ if environ is None else environ
        url, ca, token = env.get(ENV_URL, ""), env.get(ENV_CA_CERT, ""), env.get(ENV_TOKEN, "")
        if not (url or ca or token):
            return None
        given = {ENV_URL: url, ENV_CA_CERT: ca, ENV_TOKEN: token}
        missing = [name for name, value in given.items() if not value]
        if missing:
            log.warning("not reporting progress to Kubeflow Trainer: %s set but %s missing",
                        ", ".join(n for n, v in given.items() if v), ", ".join(missing))
            return None
        if urlsplit(url).scheme != "https" or not urlsplit(url).hostname:
            log.warning("not reporting progress to Kubeflow Trainer: %s=%r is not an https:// URL", ENV_URL, url)
            return None
        return cls(url, ca, token)


class StatusRejected(Exception):
    """The server answered, but not 200."""

    def __init__(self, code: int, answer: bytes):
        try:
            doc = json.loads(answer)
            detail = f"{doc.get('reason', '')}: {doc.get('message', '')}".strip(": ")
        except (ValueError, AttributeError):
            detail = answer[:200].decode("utf-8", "replace").strip()
        super().__init__(f"HTTP {code}" + (f" ({detail})" if detail else ""))
        self.code = code


class ProgressReporter:
    """Posts :class:`TrainProgress` to an :class:`Endpoint` from a background thread, at most
    every ``interval_s`` seconds of ``clock`` (plus the final post)."""

    def __init__(self, endpoint: Endpoint, interval_s: float = MIN_INTERVAL_S, timeout_s: float = POST_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.endpoint = endpoint
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.posted = 0            # posts the server accepted
        self.failed = 0            # posts that failed
        self._cond = threading.Condition()
        self._pending: TrainProgress | None = None
        self._busy = False
        self._closed = False
        self._last_start: float | None = None
        self._ca_pem: bytes | None = None
        self._tls: ssl.SSLContext | None = None
        self._unreported = 0       # failures since the last warning
        self._failing = False
        self._last_warning: float | None = None
        self._thread = threading.Thread(target=self._run, name="mtnlg-trainer-status", daemon=True)
        self._thread.start()
        log.info("reporting progress to Kubeflow Trainer at %s (at most every %g s)", endpoint.url, interval_s)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProgressReporter | None:
        endpoint = Endpoint.from_env(environ)
        return cls(endpoint) if endpoint is not None else None

    # ------------------------------------------------------------ the training thread's side
    def offer(self, progress: TrainProgress) -> bool:
        """Hand over the latest progress; never blocks on the network. True when it is posted
        (its turn came: nothing in flight and ``interval_s`` since the last post began)."""
        with self._cond:
            if self._closed or self._busy or self._pending is not None:
                return False
            now = self.clock()
            if self._last_start is not None and now - self._last_start < self.interval_s:
                return False
            self._last_start = now
            self._pending = progress
            self._cond.notify_all()
            return True

    def drain(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until no post is waiting or in flight; True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout_s)

    def close(self, final: TrainProgress | None) -> None:
        """Post ``final`` whatever the interval (after a post in flight), then stop. Waits at
        most about two post timeouts: a slow endpoint delays the end of a run by no more."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            if final is not None:
                self._pending = final  # replaces one not yet taken
            self._cond.notify_all()
        self._thread.join(2 * self.timeout_s + 1.0)

    def stop(self) -> None:
        """Stop without a final post and without waiting (a run that failed); nothing after
        :meth:`close`."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._pending = None
            self._cond.notify_all()

    # ------------------------------------------------------------ the background thread
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                progress, self._pending = self._pending, None
                self._busy = True
            try:
                self._post(progress)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _post(self, progress: TrainProgress) -> None:
        try:
            body = json.dumps(progress.body()).encode("utf-8")
            self._send(body)
        except Exception as e:  # noqa: BLE001 - nothing a report does may stop training
            self._failure(e)
        else:
            self._success()

    def _send(self, body: bytes) -> None:
        # http.client, not urllib: the controller is a cluster Service, never reached
        # through an HTTPS_PROXY the pod may have for the outside world.
        token = self._token()
        url = urlsplit(self.endpoint.url)
        conn = http.client.HTTPSConnection(url.hostname, url.port or 443, timeout=self.timeout_s,
                                           context=self._tls_context())
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        try:
            conn.request("POST", path, body=body, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json",
                "Accept": "application/json"})
            resp = conn.getresponse()
            answer = resp.read(1 << 16)  # the server caps bodies at 64 KiB too
        finally:
            conn.close()
        if resp.status != 200:
            raise StatusRejected(resp.status, answer)

    def _token(self) -> str:
        """The current token: read from its file every time (the kubelet rotates it)."""
        with open(self.endpoint.token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"the token file {self.endpoint.token_file} is empty")
        return token

    def _tls_context(self) -> ssl.SSLContext:
        """A context trusting the CA file's current content (rebuilt when the file changes)."""
        with open(self.endpoint.ca_file, "rb") as f:
            pem = f.read()
        if pem != self._ca_pem or self._tls is None:
            self._tls = ssl.create_default_context(cadata=pem.decode("ascii"))
            self._ca_pem = pem
        return self._tls

    def _failure(self, e: Exception) -> None:
        """Log the first failure, then at most one warning per ``WARN_EVERY_S`` (flapping included)."""
        self.failed += 1
        self._unreported += 1
        self._failing = True
        now = self.clock()
        if self._last_warning is not None and now - self._last_warning < WARN_EVERY_S:
            return
        cause = str(e) if isinstance(e, StatusRejected) else f"{type(e).__name__}: {e}"
        if self._last_warning is None:
            log.warning("could not report progress to Kubeflow Trainer at %s: %s; training goes on (failures are "
                        "logged at most every %.0f minutes)", self.endpoint.url, cause, WARN_EVERY_S / 60)
        else:
            log.warning("progress reports to Kubeflow Trainer failing: %d failed posts since the last warning, "
                        "the latest: %s", self._unreported, cause)
        self._last_warning = now
        self._unreported = 0

    def _success(self) -> None:
        self.posted += 1
        if self._failing:
            log.info("progress reports to Kubeflow Trainer work again (%d failed posts so far)", self.failed)
            self._failing = False
