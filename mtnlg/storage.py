"""One way to read, write, list and glob local paths, ``gs://`` and ``s3://`` URIs.

Local paths use the filesystem; ``gs://bucket/key`` uses google-cloud-storage (set
``STORAGE_EMULATOR_HOST`` to talk to an emulator, as the tests do); ``s3://bucket/key``
uses boto3 and works with any S3-compatible store (AWS S3, MinIO, SeaweedFS, Ceph RGW, the
MinIO of a Kubeflow Pipelines install). Writes are atomic: locally a temporary file in the
same directory is renamed over the final name; on GCS and S3 the content is staged in a
local temporary file and uploaded to the final name only when complete, and an object only
becomes visible when its upload completes (S3 PUT and multipart-complete are atomic), so no
partial object is ever visible under a final name.

    from mtnlg import storage
    with storage.atomic_write("gs://bucket/out/stats.json", "w") as f:
        f.write("{}")
    storage.read_text("s3://bucket/out/stats.json")

S3 settings come from the environment, as boto3 reads them:

* credentials: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, or a
  profile (``AWS_PROFILE``, ``~/.aws/credentials`` and ``~/.aws/config``), or the pod's
  role (IRSA, instance metadata);
* region: ``AWS_DEFAULT_REGION`` or the profile's (S3-compatible stores: ``us-east-1``);
* endpoint of an S3-compatible store, first set wins: ``MTNLG_S3_ENDPOINT_URL``, then
  ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL`` (the last two are boto3's own
  variables, which ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`` turns off; boto3 also reads
  ``endpoint_url`` from a profile). None: AWS S3. The URL needs its scheme (``http://``).
* addressing: path-style (``http://host:9000/bucket/key``, what MinIO and SeaweedFS need)
  whenever one of those endpoint variables is set, boto3's default (virtual-hosted)
  otherwise; ``MTNLG_S3_ADDRESSING_STYLE=path|virtual|auto`` overrides it.
* with an endpoint set, request checksums are only sent where S3 requires them (boto3's
  ``when_required``; many S3-compatible stores reject boto3's default CRC32 trailers)
  unless ``AWS_REQUEST_CHECKSUM_CALCULATION`` / ``AWS_RESPONSE_CHECKSUM_VALIDATION`` say
  otherwise.

MinIO, e.g. the one Kubeflow Pipelines installs (bucket ``mlpipeline``, credentials in the
secret ``mlpipeline-minio-artifact``, keys ``accesskey``/``secretkey``)::

    export AWS_ENDPOINT_URL_S3=http://minio-service.kubeflow:9000
    export AWS_ACCESS_KEY_ID=minio AWS_SECRET_ACCESS_KEY=minio123 AWS_DEFAULT_REGION=us-east-1
    mtnlg train ... data.path=s3://mlpipeline/tokens output=s3://mlpipeline/runs/gpt

KFP's own ``minio://`` artifact URIs are not read here (the endpoint cannot be told from
the URI); use the ``s3://`` URI of the same bucket and key with the endpoint set.

Retries: every request to a store (GCS and S3 alike) that fails in a way that may pass
(HTTP 408, 429, 500, 502, 503, 504, S3's ``SlowDown``, a reset or refused connection, a
timeout, an answer cut short or failing its checksum) is retried with bounded exponential
backoff and jitter: attempt *n* waits a random time between half and all of
``min(MTNLG_STORAGE_BACKOFF_MAX_S, MTNLG_STORAGE_BACKOFF_S * 2**(n-1))`` (defaults 0.5 s
and 30 s), up to ``MTNLG_STORAGE_ATTEMPTS`` attempts (default 8; about 30 s of waiting in
all), each retry logged as a warning on the ``mtnlg.storage`` logger with the URI, the
operation and the reason. ``MTNLG_STORAGE_TIMEOUT_S`` (default 120) bounds each request.
The client libraries' own retries are turned off, so that this is the one policy; and
since those libraries draw from Python's global ``random`` (multipart boundaries, temporary
names), whose state training checkpoints save, every operation here leaves that state as
it found it. Every retried operation is idempotent: an upload sends the whole
object again, a read asks again for the same byte range of the same object generation
(GCS) or ETag (S3), a delete of something already gone succeeds. A permanent error (a
refusal, a missing bucket or object, a bad request) is never retried.

Errors: a missing object raises ``FileNotFoundError`` naming the URI; a missing bucket
raises :class:`BucketNotFoundError` (a ``FileNotFoundError``) naming the URI and the bucket;
a refusal (403, missing credentials) raises ``PermissionError`` naming the URI and the
store's reason; other failures of a request raise :class:`RemoteStorageError` (an
``OSError``). ``exists`` answers False for a missing object and for a missing bucket named
alone (``s3://bucket``), and raises ``BucketNotFoundError`` for a path inside a missing
bucket, so that a misspelt bucket fails at the first probe rather than at the first upload.

The S3 client is cached per endpoint, addressing style, profile, region, access key id and
process; after changing anything else (a credentials file, the secret key) call
:func:`clear_client_cache`, as the tests do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob as _glob
import io
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping

GS = "gs://"
S3 = "s3://"

log = logging.getLogger("mtnlg.storage")


class RemoteStorageError(OSError):
    """A request to a remote store failed (other than missing and refused, which raise
    ``FileNotFoundError`` and ``PermissionError``); the message names the URI."""


class BucketNotFoundError(FileNotFoundError):
    """The bucket of a remote URI does not exist; the message names the URI and bucket."""


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith(GS)


def is_s3(path: str | os.PathLike) -> bool:
    return str(path).startswith(S3)


def is_remote(path: str | os.PathLike) -> bool:
    """A ``gs://`` or ``s3://`` URI: not a local path (stage it locally, upload it)."""
    return is_gcs(path) or is_s3(path)


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` or ``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    for scheme in (GS, S3):
        if uri.startswith(scheme):
            bucket, _, key = uri[len(scheme):].partition("/")
            if not bucket:
                raise ValueError(f"{scheme} URI without a bucket: {uri!r}")
            return bucket, key
    raise ValueError(f"not a gs:// or s3:// URI: {uri!r}")


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    return split_uri(uri)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return split_uri(uri)


def _scheme(uri: str) -> str:
    return GS if is_gcs(uri) else S3


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            out = out + "/" + str(p).strip("/")
        return out
    return os.path.join(base, *parts)


# --------------------------------------------------------------------------- retries


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


_jitter = random.Random()  # never the global generator: its state is part of a training checkpoint
_retry_lock = threading.Lock()
_retries: dict[str, int] = {}


def retry_counts() -> dict[str, int]:
    """Retries made by this process so far, by reason (``HTTP 503``, ``ConnectionResetError``...)."""
    with _retry_lock:
        return dict(_retries)


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


# --------------------------------------------------------------------------- GCS


@functools.lru_cache(maxsize=None)
def _client_for(emulator: str | None):
    from google.cloud import storage

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(credentials=AnonymousCredentials(), project="mtnlg-local")
    return storage.Client()


def gcs_client():
    """A google-cloud-storage client (anonymous when ``STORAGE_EMULATOR_HOST`` is set)."""
    return _client_for(os.environ.get("STORAGE_EMULATOR_HOST"))


def _blob(uri: str):
    bucket, key = split_gcs(uri)
    if not key:
        raise ValueError(f"gs:// URI names a bucket, not an object: {uri!r}")
    return gcs_client().bucket(bucket).blob(key)


def _gcs_error(uri: str, e: Exception) -> Exception | None:
    """The exception to raise for google-cloud-storage's ``e`` on ``uri`` (None: leave it)."""
    from google.api_core import exceptions as gexc

    if isinstance(e, gexc.NotFound):
        bucket = split_uri(uri)[0]
        try:
            there = _with_retries("bucket lookup", uri, lambda: gcs_client().bucket(bucket).exists(
                retry=None, timeout=retry_policy().timeout_s))
        except Exception:  # noqa: BLE001 - the lookup only refines the message
            there = True
        if not there:
            return BucketNotFoundError(f"{uri}: bucket {bucket!r} does not exist")
        return FileNotFoundError(uri)
    if isinstance(e, (gexc.Forbidden, gexc.Unauthorized)):
        return PermissionError(f"{uri}: access denied by GCS ({e.code} {e.message}); check the credentials "
                               "(GOOGLE_APPLICATION_CREDENTIALS, the pod's service account) and the bucket's IAM")
    if isinstance(e, gexc.GoogleAPICallError):
        return RemoteStorageError(f"{uri}: GCS request failed ({e.code} {e.message})")
    if type(e).__name__ == "DefaultCredentialsError":
        return PermissionError(f"{uri}: no usable GCS credentials ({e}); set GOOGLE_APPLICATION_CREDENTIALS "
                               "or run where application-default credentials exist")
    return None


@contextlib.contextmanager
def _gcs_errors(uri: str) -> Iterator[None]:
    """Turn google-cloud-storage's errors inside the block into the ones this module documents."""
    try:
        yield
    except (RemoteStorageError, FileNotFoundError, PermissionError):
        raise
    except Exception as e:
        mapped = _gcs_error(uri, e)
        if mapped is None:
            raise
        raise mapped from e


def _gcs(what: str, uri: str, fn, reset=None):
    """One GCS operation, retried, with its errors mapped."""
    with _gcs_errors(uri):
        return _with_retries(what, uri, fn, reset)


def _gcs_objects(uri: str, bucket: str, prefix: str, limit: int | None = None) -> list[tuple[str, int]]:
    """``(name, size)`` of the objects under ``prefix`` (the whole listing, fetched again if a
    page fails)."""
    t = retry_policy().timeout_s
    return _gcs("list", uri, lambda: [(b.name, int(b.size or 0)) for b in gcs_client().list_blobs(
        bucket, prefix=prefix, max_results=limit, retry=None, timeout=t)])


def _gcs_names(uri: str, bucket: str, prefix: str, limit: int | None = None) -> list[str]:
    return [n for n, _ in _gcs_objects(uri, bucket, prefix, limit)]


def _t() -> float:
    return retry_policy().timeout_s


def _gcs_exists(uri: str) -> bool:
    return _gcs("lookup", uri, lambda: _blob(uri).exists(retry=None, timeout=_t()))


def _gcs_stat(uri: str) -> tuple[int, int | None]:
    """``(size, generation)`` of an object."""
    blob = _blob(uri)
    _gcs("stat", uri, lambda: blob.reload(retry=None, timeout=_t()))
    return int(blob.size), blob.generation


def _gcs_upload(local: str, uri: str) -> None:
    """Upload a complete local file: the object appears only when the upload completes."""
    _gcs("upload", uri, lambda: _blob(uri).upload_from_filename(local, retry=None, timeout=_t()))


def _gcs_download(uri: str, fileobj: IO) -> None:
    _gcs("download", uri, lambda: _blob(uri).download_to_file(fileobj, retry=None, timeout=_t()),
         reset=_rewind(fileobj))


def _gcs_read(uri: str) -> bytes:
    return _gcs("download", uri, lambda: _blob(uri).download_as_bytes(retry=None, timeout=_t()))


def _gcs_delete(uri: str) -> None:
    from google.api_core import exceptions as gexc

    def delete() -> None:
        try:
            _blob(uri).delete(retry=None, timeout=_t())
        except gexc.NotFound:
            pass  # gone already (an earlier attempt's answer was lost)

    _gcs("delete", uri, delete)


# --------------------------------------------------------------------------- S3

_S3_CHUNK = 8 << 20      # multipart threshold and part size of uploads and downloads
_S3_READ_BUFFER = 4 << 20  # read-ahead of open_read (larger reads go straight to a ranged GET)


def s3_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The S3-compatible endpoint URL from the environment (``environ``, default this
    process's), or None (AWS S3; boto3 may still take one from the profile)."""
    environ = os.environ if environ is None else environ
    names = ["MTNLG_S3_ENDPOINT_URL"]
    if environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() != "true":
        names += ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]  # boto3's own, read the same way
    for var in names:
        url = environ.get(var, "").strip()
        if url:
            if "://" not in url:
                raise ValueError(f"{var}={url!r}: an S3 endpoint URL needs its scheme, e.g. http://{url}")
            return url
    return None


def _s3_settings() -> tuple:
    endpoint = s3_endpoint()
    style = os.environ.get("MTNLG_S3_ADDRESSING_STYLE", "").strip().lower() or ("path" if endpoint else None)
    if style not in (None, "path", "virtual", "auto"):
        raise ValueError(f"MTNLG_S3_ADDRESSING_STYLE={style!r}: expected path, virtual or auto")
    relaxed = bool(endpoint)
    # boto3 reads these itself; in the key so that a changed environment gets a new client,
    # and so does a forked process (a client's connection pool must not be shared)
    env = tuple(os.environ.get(v) for v in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION",
                                             "AWS_ACCESS_KEY_ID", "AWS_REQUEST_CHECKSUM_CALCULATION",
                                             "AWS_RESPONSE_CHECKSUM_VALIDATION")) + (os.getpid(),)
    return endpoint, style, relaxed, retry_policy().timeout_s, env


@functools.lru_cache(maxsize=None)
def _s3_client_for(endpoint: str | None, addressing_style: str | None, relaxed_checksums: bool, timeout_s: float,
                   env: tuple):
    import boto3
    from botocore.config import Config

    # botocore's own retries off: _with_retries is the one policy (and logs each retry)
    kw = {"retries": {"mode": "standard", "total_max_attempts": 1}, "connect_timeout": timeout_s,
          "read_timeout": timeout_s}
    if addressing_style:
        kw["s3"] = {"addressing_style": addressing_style}
    if relaxed_checksums:
        if not os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION"):
            kw["request_checksum_calculation"] = "when_required"
        if not os.environ.get("AWS_RESPONSE_CHECKSUM_VALIDATION"):
            kw["response_checksum_validation"] = "when_required"
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, config=Config(**kw))


def s3_client():
    """A boto3 S3 client for the environment's endpoint and credentials (cached)."""
    return _s3_client_for(*_s3_settings())


def clear_client_cache() -> None:
    """Forget the cached GCS and S3 clients (after changing the environment, in tests)."""
    _client_for.cache_clear()
    _s3_client_for.cache_clear()


def _s3_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"s3:// URI names a bucket, not an object: {uri!r}")
    return bucket, key


def _where() -> str:
    return s3_endpoint() or "AWS S3"


def _s3_error(uri: str, e: Exception, missing_ok: bool = False, check_bucket: bool = True) -> Exception | None:
    """The exception to raise for botocore's ``e`` on ``uri`` (None: a missing object and
    ``missing_ok``). ``check_bucket=False`` skips telling a missing bucket from a missing
    object after a bodiless 404 (when a listing, which names a missing bucket, follows)."""
    from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError,
                                     NoCredentialsError, PartialCredentialsError)

    if isinstance(e, ClientError):
        err = e.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        reason = f"{code}: {err['Message']}" if err.get("Message") else (code or f"HTTP {status}")
        bucket = split_uri(uri)[0]
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"{uri}: bucket {bucket!r} does not exist at {_where()} ({reason})")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            # a HEAD answer has no body: a missing bucket and a missing key both read "404"
            if code != "NoSuchKey" and check_bucket and not _s3_bucket_exists(uri, bucket):
                return BucketNotFoundError(f"{uri}: bucket {bucket!r} does not exist at {_where()}")
            return None if missing_ok else FileNotFoundError(uri)
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "AllAccessDisabled", "AccountProblem", "ExpiredToken", "InvalidToken") or status == 403:
            return PermissionError(f"{uri}: access denied by {_where()} ({reason}); check the credentials "
                                   "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket "
                                   "policy (a missing object also reads 403 without s3:ListBucket)")
        return RemoteStorageError(f"{uri}: S3 request to {_where()} failed ({reason})")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return PermissionError(f"{uri}: no usable S3 credentials ({e}); set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(e, EndpointConnectionError):
        return RemoteStorageError(f"{uri}: cannot reach the S3 endpoint {_where()} ({e})")
    if isinstance(e, BotoCoreError):
        return RemoteStorageError(f"{uri}: S3 request to {_where()} failed ({type(e).__name__}: {e})")
    return None


def _s3_unwrap(e: Exception) -> Exception:
    """boto3's ``S3UploadFailedError`` hides the ``ClientError`` it was raised from."""
    from boto3.exceptions import S3UploadFailedError

    if isinstance(e, S3UploadFailedError):
        inner = e.__cause__ or e.__context__
        if inner is not None:
            return inner
    return e


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore's errors inside the block into the ones this module documents."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error) as e:
        mapped = _s3_error(uri, _s3_unwrap(e))
        if mapped is None:
            raise
        raise mapped from e


def _s3_bucket_exists(uri: str, bucket: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _with_retries("bucket lookup", uri, lambda: s3_client().head_bucket(Bucket=bucket))
        return True
    except ClientError as e:
        err = e.response.get("Error", {}) or {}
        if str(err.get("Code", "")) in ("404", "NoSuchBucket", "NotFound") or \
                e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        mapped = _s3_error(uri, e)
        raise (mapped or e) from e
    except BotoCoreError as e:
        raise (_s3_error(uri, e) or e) from e


def _s3_head(uri: str, check_bucket: bool = True) -> dict | None:
    """The object's HEAD answer, or None if there is no such object (in an existing bucket,
    unless ``check_bucket`` is False)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _s3_key(uri)
    try:
        return _with_retries("lookup", uri, lambda: s3_client().head_object(Bucket=bucket, Key=key))
    except (ClientError, BotoCoreError) as e:
        mapped = _s3_error(uri, e, missing_ok=True, check_bucket=check_bucket)
        if mapped is None and isinstance(e, ClientError):
            return None
        raise (mapped or e) from e


def _s3_keys(uri: str, prefix: str, limit: int | None = None) -> Iterator[str]:
    """Keys under ``prefix`` in ``uri``'s bucket, in S3's (lexicographic) order."""
    return (k for k, _ in _s3_objects(uri, prefix, limit))


def _s3_objects(uri: str, prefix: str, limit: int | None = None) -> Iterator[tuple[str, int]]:
    """``(key, size)`` under ``prefix`` in ``uri``'s bucket, in S3's (lexicographic) order."""
    bucket = split_s3(uri)[0]

    def page(token: str | None) -> dict:
        kw = {"Bucket": bucket, "Prefix": prefix}
        if limit is not None:
            kw["MaxKeys"] = limit
        if token:
            kw["ContinuationToken"] = token
        return s3_client().list_objects_v2(**kw)

    token = None
    with _s3_errors(uri):
        while True:  # page by page, each page retried on its own
            resp = _with_retries("list", uri, lambda: page(token))
            yield from ((o["Key"], int(o.get("Size", 0))) for o in resp.get("Contents", []))
            token = resp.get("NextContinuationToken")
            if limit is not None or not resp.get("IsTruncated") or not token:
                return


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_S3_CHUNK, multipart_chunksize=_S3_CHUNK)


def _s3_upload(local: str, uri: str) -> None:
    """Upload a complete local file to ``uri``: the object appears only when it is whole."""
    bucket, key = _s3_key(uri)
    with _s3_errors(uri):
        _with_retries("upload", uri, lambda: s3_client().upload_file(local, bucket, key, Config=_transfer_config()))


def _s3_download(uri: str, fileobj: IO) -> None:
    bucket, key = _s3_key(uri)
    with _s3_errors(uri):
        _with_retries("download", uri, lambda: s3_client().download_fileobj(bucket, key, fileobj,
                                                                            Config=_transfer_config()),
                      reset=_rewind(fileobj))


class _RangedReader(io.RawIOBase):
    """A seekable read-only view of one object: every read is a ranged request for the
    object as it was when opened (a replaced object fails instead of mixing two), retried
    on its own; a short answer (a cut connection) is asked for again."""

    name: str

    def __init__(self, uri: str, size: int):
        self.uri = uri
        self.name = uri
        self._size = size
        self._pos = 0

    def _fetch(self, start: int, end: int) -> bytes:  # bytes start..end inclusive
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def _get(self, n: int) -> bytes:
        if n <= 0 or self._pos >= self._size:
            return b""
        start, end = self._pos, min(self._size, self._pos + n) - 1

        def fetch() -> bytes:
            data = self._fetch(start, end)
            if len(data) != end - start + 1:
                raise _ShortRead(f"{self.uri}: asked for bytes {start}-{end}, got {len(data)}")
            return data

        data = self._retrying(fetch)
        self._pos += len(data)
        return data

    def _retrying(self, fn):
        return _with_retries("read", self.uri, fn)

    def readinto(self, b) -> int:
        data = self._get(len(b))
        b[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self._get(self._size - self._pos)


class _S3Reader(_RangedReader):
    def __init__(self, uri: str):
        head = _s3_head(uri)
        if head is None:
            raise FileNotFoundError(uri)
        super().__init__(uri, int(head["ContentLength"]))
        self._bucket, self._key = _s3_key(uri)
        self._etag = head.get("ETag")

    def _fetch(self, start: int, end: int) -> bytes:
        kw = {"IfMatch": self._etag} if self._etag else {}
        body = s3_client().get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={start}-{end}", **kw)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def _retrying(self, fn):
        with _s3_errors(self.uri):
            return super()._retrying(fn)


class _GCSReader(_RangedReader):
    def __init__(self, uri: str):
        size, self._generation = _gcs_stat(uri)
        super().__init__(uri, size)
        self._blob = _blob(uri)

    def _fetch(self, start: int, end: int) -> bytes:
        kw = {"if_generation_match": self._generation} if self._generation else {}
        return self._blob.download_as_bytes(start=start, end=end, retry=None, timeout=_t(), checksum=None, **kw)

    def _retrying(self, fn):
        with _gcs_errors(self.uri):
            return super()._retrying(fn)


# --------------------------------------------------------------------------- any location


def exists(path: str | os.PathLike) -> bool:
    path = str(path)
    if is_gcs(path):
        bucket, key = split_gcs(path)
        if not key:
            return _gcs("bucket lookup", path, lambda: gcs_client().bucket(bucket).exists(retry=None, timeout=_t()))
        if _gcs_exists(path):
            return True
        return isdir(path)  # a missing bucket raises here
    if is_s3(path):
        bucket, key = split_s3(path)
        if not key:
            return _s3_bucket_exists(path, bucket)
        if _s3_head(path, check_bucket=False) is not None:
            return True
        return isdir(path)  # a missing bucket raises here
    return os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    """Local: a directory. GCS, S3: some object lies under ``path/``."""
    path = str(path)
    if is_gcs(path):
        bucket, key = split_gcs(path)
        prefix = key.rstrip("/") + "/" if key else ""
        return bool(_gcs_names(path, bucket, prefix, limit=1))
    if is_s3(path):
        key = split_s3(path)[1]
        prefix = key.rstrip("/") + "/" if key else ""
        return any(True for _ in _s3_keys(path, prefix, limit=1))
    return os.path.isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """Create a local directory (and parents); a no-op for gs:// and s3:// (no directories there)."""
    if not is_remote(path):
        os.makedirs(str(path), exist_ok=True)


def open_read(path: str | os.PathLike, mode: str = "rb") -> IO:
    """Open a file for reading; ``mode`` is ``"rb"`` or ``"r"`` (UTF-8). Seekable; on
    gs:// and s3:// reads are ranged requests."""
    path = str(path)
    if mode not in ("rb", "r"):
        raise ValueError(f"open_read mode must be 'rb' or 'r', got {mode!r}")
    if is_remote(path):
        raw = _GCSReader(path) if is_gcs(path) else _S3Reader(path)
        f = io.BufferedReader(raw, buffer_size=_S3_READ_BUFFER)
        return io.TextIOWrapper(f, encoding="utf-8") if mode == "r" else f
    if mode == "r":
        return open(path, "r", encoding="utf-8")
    return open(path, "rb")


def read_bytes(path: str | os.PathLike) -> bytes:
    path = str(path)
    if is_gcs(path):
        return _gcs_read(path)
    if is_s3(path):
        bucket, key = _s3_key(path)

        def get() -> bytes:
            resp = s3_client().get_object(Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            if len(data) != resp.get("ContentLength", len(data)):
                raise _ShortRead(f"{path}: expected {resp['ContentLength']} bytes, got {len(data)}")
            return data

        with _s3_errors(path):
            return _with_retries("download", path, get)
    with open(path, "rb") as f:
        return f.read()


def open_ranged(path: str | os.PathLike) -> IO:
    """A seekable, unbuffered binary reader: on gs:// and s3:// every ``read(n)`` is one
    ranged request for exactly those bytes of the object as it was when opened (retried;
    refused if the object changed since); a plain file locally."""
    path = str(path)
    if is_remote(path):
        return _GCSReader(path) if is_gcs(path) else _S3Reader(path)
    return open(path, "rb", buffering=0)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` so that no partial file is ever visible under its final name.

    If the body raises, the temporary file is removed and ``path`` is untouched (on gs://
    and s3:// nothing is uploaded).
    """
    path = str(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    kw = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    if is_remote(path):
        fd, tmp = tempfile.mkstemp(prefix=".mtnlg-upload-")
        os.close(fd)
        try:
            with open(tmp, mode, **kw) as f:
                yield f
            if is_gcs(path):
                _gcs_upload(tmp, path)
            else:
                _s3_upload(tmp, path)
        finally:
            os.unlink(tmp)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def size(path: str | os.PathLike) -> int:
    path = str(path)
    if is_gcs(path):
        return _gcs_stat(path)[0]
    if is_s3(path):
        head = _s3_head(path)
        if head is None:
            raise FileNotFoundError(path)
        return int(head["ContentLength"])
    return os.path.getsize(path)


def list_files(path: str | os.PathLike) -> list[str]:
    """All files under a directory (recursively), sorted; a file path returns itself."""
    path = str(path)
    if is_gcs(path):
        bucket, key = split_gcs(path)
        if key and _gcs_exists(path):
            return [path]
        prefix = key.rstrip("/") + "/" if key else ""
        return sorted(f"{GS}{bucket}/{n}" for n in _gcs_names(path, bucket, prefix) if not n.endswith("/"))
    if is_s3(path):
        bucket, key = split_s3(path)
        if key and _s3_head(path, check_bucket=False) is not None:
            return [path]
        prefix = key.rstrip("/") + "/" if key else ""
        return sorted(f"{S3}{bucket}/{k}" for k in _s3_keys(path, prefix) if not k.endswith("/"))
    if os.path.isfile(path):
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in files)
    return sorted(out)


def file_sizes(path: str | os.PathLike) -> dict[str, int]:
    """The size of every file under a directory (recursively), by name relative to it, from
    one listing (no request per file on gs:// and s3://)."""
    path = str(path)
    if is_remote(path):
        bucket, key = split_uri(path)
        prefix = key.rstrip("/") + "/" if key else ""
        objects = _gcs_objects(path, bucket, prefix) if is_gcs(path) else _s3_objects(path, prefix)
        return {n[len(prefix):]: size for n, size in objects if not n.endswith("/")}
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path).replace(os.sep, "/")] = os.path.getsize(full)
    return out


def glob(pattern: str) -> list[str]:
    """Files matching a glob (``*``, ``?``, ``[...]``, ``**``), local, gs:// or s3://, sorted."""
    if is_remote(pattern):
        scheme = _scheme(pattern)
        bucket, key = split_uri(pattern)
        first_wild = min([i for i in (key.find(c) for c in "*?[") if i >= 0], default=len(key))
        prefix = key[:first_wild]
        if scheme == GS:
            names = _gcs_names(pattern, bucket, prefix)
        else:
            names = _s3_keys(pattern, prefix)
        rx = _glob_regex(key)
        return sorted(f"{scheme}{bucket}/{n}" for n in names if rx.fullmatch(n) and not n.endswith("/"))
    return sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))


def _glob_regex(pattern: str):
    import re

    # '**/' matches any number of directories; '*' does not cross '/'.
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            j = i
            while j < len(pattern) and pattern[j] not in "*?":
                j += 1
            out += fnmatch.translate(pattern[i:j])[4:-3] if "[" in pattern[i:j] else re.escape(pattern[i:j])
            i = j
    return re.compile(out)


def has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand(inputs: list[str]) -> list[str]:
    """Files named by paths, directories and globs (local, gs:// or s3://), in order, deduplicated.

    A name that matches nothing raises ``FileNotFoundError`` naming it.
    """
    out: list[str] = []
    seen = set()
    for item in inputs:
        item = str(item)
        files = glob(item) if has_glob(item) else (list_files(item) if exists(item) else [])
        if not files:
            raise FileNotFoundError(f"input {item!r} matches no file")
        for f in files:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def copy(src: str, dst: str) -> None:
    """Copy one file between any two locations (atomically at the destination)."""
    src, dst = str(src), str(dst)
    if not is_remote(src) and not is_remote(dst):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        with open(src, "rb") as fi, atomic_write(dst) as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        return
    if is_gcs(dst) and not is_remote(src):
        with open(src, "rb"):
            pass  # the usual FileNotFoundError / IsADirectoryError, before any request
        _gcs_upload(src, dst)
        return
    if is_s3(dst) and not is_remote(src):
        with open(src, "rb"):
            pass  # the usual FileNotFoundError / IsADirectoryError, before any request
        _s3_upload(src, dst)
        return
    if is_gcs(src) and not is_remote(dst):
        with atomic_write(dst) as fo:
            _gcs_download(src, fo)
        return
    if is_s3(src) and not is_remote(dst):
        with atomic_write(dst) as fo:
            _s3_download(src, fo)
        return
    if is_s3(src) and is_s3(dst):  # server-side (multipart for big objects); atomic like a PUT
        if _s3_head(src) is None:
            raise FileNotFoundError(src)
        if src == dst:
            return  # S3 refuses to copy an object onto itself unchanged
        (sb, sk), (db, dk) = _s3_key(src), _s3_key(dst)
        with _s3_errors(dst):
            _with_retries("copy", dst, lambda: s3_client().copy({"Bucket": sb, "Key": sk}, db, dk,
                                                                Config=_transfer_config()))
        return
    if is_gcs(src) and is_gcs(dst):
        write_bytes(dst, read_bytes(src))
        return
    # between gs:// and s3://: through a local temporary file, uploaded once complete
    with tempfile.TemporaryDirectory(prefix="mtnlg-copy-") as d:
        tmp = os.path.join(d, "object")
        copy(src, tmp)
        copy(tmp, dst)


def copy_tree(src: str, dst: str) -> list[str]:
    """Copy every file under ``src`` to the same relative path under ``dst``."""
    out = []
    base = src.rstrip("/")
    for f in list_files(src):
        rel = f[len(base):].lstrip("/").lstrip(os.sep)
        target = join(dst, rel)
        copy(f, target)
        out.append(target)
    return out


_GCS_BATCH = 100     # deletions per GCS batch request (the JSON API's limit)
_S3_BATCH = 1000     # keys per S3 DeleteObjects request (the API's limit)


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _gcs_delete_many(prefix: str, uris: list[str]) -> None:
    """Delete ``uris`` (under ``prefix``) in batch requests of 100; whatever a failed or
    cut-off batch left is found again by listing and deleted in the next round."""
    bucket = split_gcs(prefix)[0]
    wanted = set(uris)
    remaining = uris
    for _ in range(retry_policy().attempts):
        def batches() -> None:
            client = gcs_client()
            for chunk in _chunks(remaining, _GCS_BATCH):
                with client.batch():
                    for u in chunk:
                        client.bucket(bucket).blob(split_gcs(u)[1]).delete(retry=None, timeout=_t())

        try:
            _gcs("delete", prefix, batches)
        except FileNotFoundError:
            pass  # some object was gone already (an earlier answer lost): list what is left
        remaining = [u for u in list_files(prefix) if u in wanted]
        if not remaining:
            return
    raise RemoteStorageError(f"{prefix}: {len(remaining)} objects still there after deleting "
                             f"{retry_policy().attempts} times (first: {remaining[0]})")


def _s3_delete_many(prefix: str, uris: list[str]) -> None:
    """Delete ``uris`` with DeleteObjects, 1000 keys a request; keys the answer reports as
    failed with a transient code are sent again, others fail naming the key."""
    for chunk in _chunks(uris, _S3_BATCH):
        bucket = _s3_key(chunk[0])[0]
        pending = [_s3_key(u)[1] for u in chunk]
        for attempt in range(1, retry_policy().attempts + 1):
            def send() -> dict:
                return s3_client().delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in pending], "Quiet": True})

            with _s3_errors(prefix):
                answer = _with_retries("delete", prefix, send)
            errors = answer.get("Errors") or []
            if not errors:
                break
            bad = [e for e in errors if e.get("Code") not in _TRANSIENT_CODES]
            if bad:
                e = bad[0]
                uri = f"s3://{bucket}/{e.get('Key')}"
                if e.get("Code") == "AccessDenied":
                    raise PermissionError(f"{uri}: delete refused ({e.get('Message', 'AccessDenied')})")
                raise RemoteStorageError(f"{uri}: delete failed: {e.get('Code')} {e.get('Message', '')}")
            pending = [e["Key"] for e in errors]
            if attempt == retry_policy().attempts:
                raise RemoteStorageError(f"s3://{bucket}/{pending[0]}: delete failed {attempt} times "
                                         f"({errors[0].get('Code')}); gave up")
            time.sleep(retry_policy().delay(attempt, _jitter))


def remove(path: str) -> None:
    """Remove a file or a whole directory / gs:// or s3:// prefix; a prefix's objects go in
    bulk (GCS batch requests of 100, S3 DeleteObjects of 1000), so pruning a checkpoint of
    thousands of shards takes tens of requests, not thousands."""
    if is_gcs(path):
        files = list_files(path)
        if len(files) <= 1:
            for f in files:
                _gcs_delete(f)
        else:
            _gcs_delete_many(path, files)
        return
    if is_s3(path):
        files = list_files(path)
        if files:
            _s3_delete_many(path, files)
        return
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _is_object(path: str) -> bool:
    if is_gcs(path):
        return _gcs_exists(path)
    return bool(split_s3(path)[1]) and _s3_head(path) is not None


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding ``path``'s content (a download for gs:// and s3://, the path
    itself locally)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mtnlg-") as d:
        local = os.path.join(d, os.path.basename(path.rstrip("/")) or "object")
        if isdir(path) and not _is_object(path):
            copy_tree(path, local)
        else:
            copy(path, local)
        yield local


@contextlib.contextmanager
def local_dir_for_output(path: str) -> Iterator[str]:
    """A local directory to write into; for gs:// and s3:// it is uploaded to ``path`` on success."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mtnlg-out-") as d:
        yield d
        copy_tree(d, path)


def local_path(path: str | os.PathLike) -> Path:
    if is_remote(path):
        raise ValueError(f"{path} is a {_scheme(str(path))} URI, not a local path")
    return Path(path)


def write_failure_hint(path: str, exc: BaseException) -> str:
    """Why a write under local ``path`` may have failed, in facts: the free space left and any
    file-size limit of this process (a full disk shows up as ENOSPC or EFBIG, or inside a
    library as a short write)."""
    import errno
    import resource

    parts = []
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        parts.append(f"{os.strerror(code)}")
    if not is_remote(path):
        probe = path
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        try:
            free = shutil.disk_usage(probe or ".").free
            parts.append(f"{free / 1e9:.2f} GB free on {probe or '.'}")
        except OSError:
            pass
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        parts.append(f"file-size limit {soft} bytes (ulimit -f)")
    return "; ".join(parts) or "no disk-space cause found"
