"""How a request to a store is retried: the one policy, applied by
:meth:`~mtnlg.storage.objects.ObjectStore.request` around every request a backend sends.

A failure that may pass (HTTP 408, 429, 500, 502, 503, 504, S3's ``SlowDown``, a reset or
refused connection, a timeout, an answer cut short or failing its checksum) is sent again
with bounded exponential backoff and jitter: attempt *n* waits a random time between half
and all of ``min(MTNLG_STORAGE_BACKOFF_MAX_S, MTNLG_STORAGE_BACKOFF_S * 2**(n-1))``
(defaults 0.5 s and 30 s), up to ``MTNLG_STORAGE_ATTEMPTS`` attempts (default 8), each
retry logged as a warning on the ``mtnlg.storage`` logger with the URI, the operation and
the reason. ``MTNLG_STORAGE_TIMEOUT_S`` (default 120) bounds each request. Every retried
operation leaves Python's global ``random`` as it found it (the client libraries draw from
it; training checkpoints save it). A permanent error is never retried.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import IO

from .errors import RemoteStorageError

log = logging.getLogger("mtnlg.storage")


@dataclass(frozen=True)
class RetryPolicy:
    """How requests to a store are retried (read from the environment by :func:`retry_policy`)."""

    attempts: int = 8          # MTNLG_STORAGE_ATTEMPTS: tries of one request, the first included
    backoff_s: float = 0.5     # MTNLG_STORAGE_BACKOFF_S: the wait before the first retry (at most)
    backoff_max_s: float = 30.0  # MTNLG_STORAGE_BACKOFF_MAX_S: no wait is longer
    timeout_s: float = 120.0   # MTNLG_STORAGE_TIMEOUT_S: connect and read timeout of a request

    def delay(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (1, 2, ...): exponential, capped, jittered
        between half and all of it."""
        cap = min(self.backoff_max_s, self.backoff_s * 2 ** (retry - 1))
        return cap / 2 + rng.uniform(0, cap / 2)


_ENV_POLICY = {"MTNLG_STORAGE_ATTEMPTS": ("attempts", int, 1), "MTNLG_STORAGE_BACKOFF_S": ("backoff_s", float, 0.0),
               "MTNLG_STORAGE_BACKOFF_MAX_S": ("backoff_max_s", float, 0.0),
               "MTNLG_STORAGE_TIMEOUT_S": ("timeout_s", float, 0.001)}


def retry_policy() -> RetryPolicy:
    """The retry policy the environment sets (``MTNLG_STORAGE_ATTEMPTS``, ``..._BACKOFF_S``,
    ``..._BACKOFF_MAX_S``, ``..._TIMEOUT_S``); a malformed value is an error naming it."""
    kw = {}
    for var, (field, kind, least) in _ENV_POLICY.items():
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"{var}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
        if not value >= least:  # also refuses nan
            raise ValueError(f"{var}={raw!r}: must be at least {least}")
        kw[field] = value
    return RetryPolicy(**kw)


def timeout_s() -> float:
    """The per-request timeout the policy sets."""
    return retry_policy().timeout_s


_jitter = random.Random()  # never the global generator: its state is part of a training checkpoint
_retry_lock = threading.Lock()
_retries: dict[str, int] = {}


def retry_counts() -> dict[str, int]:
    """Retries made by this process so far, by reason (``HTTP 503``, ``ConnectionResetError``...)."""
    with _retry_lock:
        return dict(_retries)


def pause(retry: int) -> None:
    """Wait as the policy says before retry number ``retry`` (for a bulk answer that reports
    some items failed with a transient code)."""
    time.sleep(retry_policy().delay(retry, _jitter))


_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                              "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
                              "BandwidthLimitExceeded", "RequestTimeoutException", "backendError", "rateLimitExceeded"})


class _ShortRead(OSError):
    """A store answered with fewer bytes than it said it would (the connection was cut)."""


def _unwrap(e: BaseException) -> BaseException:
    """The error a transfer library's own wrapper hides (boto3's upload and download failures)."""
    for _ in range(4):
        name = type(e).__name__
        inner = None
        if name == "S3UploadFailedError":
            inner = e.__cause__ or e.__context__
        elif name == "RetriesExceededError":  # s3transfer's, after its own streaming retries
            inner = getattr(e, "last_exception", None)
        if inner is None:
            return e
        e = inner
    return e


def _transient(e: BaseException) -> str | None:
    """Why ``e`` may pass if the request is sent again, or None if it will not (a refusal,
    something missing, a bad request, a bug)."""
    e = _unwrap(e)
    status = None
    code = ""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):  # botocore ClientError
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str((resp.get("Error") or {}).get("Code", ""))
    elif resp is not None and isinstance(getattr(resp, "status_code", None), int):  # resumable-media InvalidResponse
        status = resp.status_code
    if isinstance(getattr(e, "code", None), int) and type(e).__module__.startswith("google.api_core"):
        status = e.code
    if code in _TRANSIENT_CODES:
        return code
    if status in _TRANSIENT_STATUS:
        return f"HTTP {status}"
    if status is not None:
        return None
    import http.client

    if isinstance(e, (ConnectionError, TimeoutError, http.client.IncompleteRead, http.client.RemoteDisconnected,
                      _ShortRead)):
        return type(e).__name__
    mod, name = type(e).__module__, type(e).__name__
    if mod.startswith("requests") and name in ("ConnectionError", "ChunkedEncodingError", "Timeout", "ReadTimeout",
                                               "ConnectTimeout", "ContentDecodingError"):
        return name
    if mod.startswith("urllib3") and name in ("ProtocolError", "ReadTimeoutError", "ConnectTimeoutError",
                                              "NewConnectionError", "IncompleteRead", "SSLError", "PoolError"):
        return name
    if mod.startswith("botocore"):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError

        if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)):
            return name
    if name == "DataCorruption":  # google-cloud-storage: a download failed its checksum
        return "checksum mismatch"
    if mod.startswith("google.auth") and name == "TransportError":
        return name
    return None


def _with_retries(what: str, uri: str, fn, reset=None):
    """``fn()``, sent again after a transient failure as the policy says; ``reset()`` runs
    before each retry (to rewind a file being downloaded into). Gives up with
    :class:`RemoteStorageError` naming the URI, the attempts and the last reason."""
    policy = retry_policy()
    attempt = 1
    state = random.getstate()
    while True:
        try:
            return fn()
        except Exception as e:
            reason = _transient(e)
            if reason is None:
                raise
            if attempt >= policy.attempts:
                raise RemoteStorageError(f"{uri}: {what} failed {attempt} times, the last with {reason} ({e}); "
                                         f"gave up (MTNLG_STORAGE_ATTEMPTS={policy.attempts})") from e
            wait = policy.delay(attempt, _jitter)
            with _retry_lock:
                _retries[reason] = _retries.get(reason, 0) + 1
            log.warning("%s: %s failed (%s), attempt %d of %d; retrying in %.2f s", uri, what, reason, attempt,
                        policy.attempts, wait)
            if reset is not None:
                reset()
            time.sleep(wait)
            attempt += 1
        finally:
            # the client libraries draw multipart boundaries and temporary names from the
            # global generator; a training checkpoint saves its state, which must not depend
            # on how many requests were sent
            random.setstate(state)


def _rewind(f: IO):
    def reset() -> None:
        f.seek(0)
        f.truncate()
    return reset
