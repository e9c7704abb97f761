"""``s3://bucket/key``: AWS S3 or any S3-compatible store (MinIO, SeaweedFS, Ceph RGW, the
MinIO of a Kubeflow Pipelines install) through boto3, set up from the environment as boto3
reads it:

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

The client is cached per endpoint, addressing style, profile, region, access key id and
process; botocore's own retries are off (:class:`ObjectStore` retries each request).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from typing import IO

from .backend import register, split_uri
from .errors import BucketNotFoundError, RemoteStorageError
from .objects import ObjectStore, RangedReader
from .retry import _TRANSIENT_CODES, _rewind, _ShortRead, pause, retry_policy

S3 = "s3://"
_S3_CHUNK = 8 << 20      # multipart threshold and part size of uploads and downloads
_S3_BATCH = 1000         # keys per S3 DeleteObjects request (the API's limit)


def is_s3(path: str | os.PathLike) -> bool:
    return str(path).startswith(S3)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return split_uri(uri)


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

    # botocore's own retries off: ObjectStore.request is the one policy (and logs each retry)
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


def _s3_key(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"s3:// URI names a bucket, not an object: {uri!r}")
    return bucket, key


def _where() -> str:
    return s3_endpoint() or "AWS S3"


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_S3_CHUNK, multipart_chunksize=_S3_CHUNK)


def _missing_bucket(e: Exception) -> bool:
    """A HEAD of a bucket answered that there is no such bucket."""
    err = e.response.get("Error", {}) or {}
    return str(err.get("Code", "")) in ("404", "NoSuchBucket", "NotFound") or \
        e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404


class S3Store(ObjectStore):
    scheme = S3

    def _error(self, uri: str, e: Exception, check_bucket: bool = True) -> Exception | None:
        """The exception to raise for botocore's ``e`` on ``uri`` (None: leave it).
        ``check_bucket=False`` skips telling a missing bucket from a missing object after a
        bodiless 404 (when a listing, which names a missing bucket, follows)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

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
                if code != "NoSuchKey" and check_bucket and not self.bucket_exists(uri):
                    return BucketNotFoundError(f"{uri}: bucket {bucket!r} does not exist at {_where()}")
                return FileNotFoundError(uri)
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

    @contextlib.contextmanager
    def errors(self, uri: str, check_bucket: bool = True) -> Iterator[None]:
        from boto3.exceptions import Boto3Error, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as e:
            inner = e
            if isinstance(e, S3UploadFailedError):  # it hides the ClientError it was raised from
                inner = e.__cause__ or e.__context__ or e
            mapped = self._error(uri, inner, check_bucket)
            if mapped is None:
                raise
            raise mapped from e

    def bucket_exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket = split_s3(uri)[0]

        def head() -> bool:
            try:
                s3_client().head_bucket(Bucket=bucket)
                return True
            except ClientError as e:
                if _missing_bucket(e):
                    return False
                raise

        return self.request("bucket lookup", uri, head)

    def head(self, uri: str, check_bucket: bool = True) -> dict | None:
        """The object's HEAD answer, or None if there is no such object (in an existing
        bucket, unless ``check_bucket`` is False)."""
        bucket, key = _s3_key(uri)
        try:
            return self.request("lookup", uri, lambda: s3_client().head_object(Bucket=bucket, Key=key),
                                check_bucket=check_bucket)
        except BucketNotFoundError:
            raise
        except FileNotFoundError:
            return None

    def is_object(self, uri: str) -> bool:
        return self.head(uri, check_bucket=False) is not None

    def objects(self, uri: str, prefix: str, limit: int | None = None) -> Iterator[tuple[str, int]]:
        """Page by page, each page retried on its own."""
        bucket = split_s3(uri)[0]

        def page(token: str | None) -> dict:
            kw = {"Bucket": bucket, "Prefix": prefix}
            if limit is not None:
                kw["MaxKeys"] = limit
            if token:
                kw["ContinuationToken"] = token
            return s3_client().list_objects_v2(**kw)

        token = None
        while True:
            resp = self.request("list", uri, lambda token=token: page(token))
            yield from ((o["Key"], int(o.get("Size", 0))) for o in resp.get("Contents", []))
            token = resp.get("NextContinuationToken")
            if limit is not None or not resp.get("IsTruncated") or not token:
                return

    def size(self, path: str) -> int:
        head = self.head(path)
        if head is None:
            raise FileNotFoundError(path)
        return int(head["ContentLength"])

    def read_bytes(self, path: str) -> bytes:
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

        return self.request("download", path, get)

    def open_ranged(self, path: str) -> IO:
        return _S3Reader(path)

    def upload(self, local: str, path: str) -> None:
        bucket, key = _s3_key(path)
        self.request("upload", path, lambda: s3_client().upload_file(local, bucket, key, Config=_transfer_config()))

    def download(self, path: str, fileobj: IO) -> None:
        bucket, key = _s3_key(path)
        self.request("download", path, lambda: s3_client().download_fileobj(bucket, key, fileobj,
                                                                             Config=_transfer_config()),
                     reset=_rewind(fileobj))

    def copy(self, src: str, dst: str) -> None:
        """Server-side (multipart for big objects); atomic like a PUT."""
        if self.head(src) is None:
            raise FileNotFoundError(src)
        if src == dst:
            return  # S3 refuses to copy an object onto itself unchanged
        (sb, sk), (db, dk) = _s3_key(src), _s3_key(dst)
        self.request("copy", dst, lambda: s3_client().copy({"Bucket": sb, "Key": sk}, db, dk,
                                                           Config=_transfer_config()))

    def delete_many(self, prefix: str, uris: list[str]) -> None:
        """DeleteObjects, 1000 keys a request; keys the answer reports as failed with a
        transient code are sent again, others fail naming the key."""
        attempts = retry_policy().attempts
        for i in range(0, len(uris), _S3_BATCH):
            chunk = uris[i:i + _S3_BATCH]
            bucket = _s3_key(chunk[0])[0]
            pending = [_s3_key(u)[1] for u in chunk]
            for attempt in range(1, attempts + 1):
                def send(bucket: str = bucket, pending: list[str] = pending) -> dict:
                    return s3_client().delete_objects(
                        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in pending], "Quiet": True})

                errors = self.request("delete", prefix, send).get("Errors") or []
                if not errors:
                    break
                bad = [e for e in errors if e.get("Code") not in _TRANSIENT_CODES]
                if bad:
                    e = bad[0]
                    uri = f"{S3}{bucket}/{e.get('Key')}"
                    if e.get("Code") == "AccessDenied":
                        raise PermissionError(f"{uri}: delete refused ({e.get('Message', 'AccessDenied')})")
                    raise RemoteStorageError(f"{uri}: delete failed: {e.get('Code')} {e.get('Message', '')}")
                pending = [e["Key"] for e in errors]
                if attempt == attempts:
                    raise RemoteStorageError(f"{S3}{bucket}/{pending[0]}: delete failed {attempt} times "
                                             f"({errors[0].get('Code')}); gave up")
                pause(attempt)

    def clear_cache(self) -> None:
        _s3_client_for.cache_clear()


STORE = register(S3Store())


class _S3Reader(RangedReader):
    """Ranged reads of one version (ETag) of an S3 object."""

    def __init__(self, uri: str):
        head = STORE.head(uri)
        if head is None:
            raise FileNotFoundError(uri)
        super().__init__(STORE, uri, int(head["ContentLength"]))
        self._bucket, self._key = _s3_key(uri)
        self._etag = head.get("ETag")

    def _fetch(self, start: int, end: int) -> bytes:
        kw = {"IfMatch": self._etag} if self._etag else {}
        body = s3_client().get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={start}-{end}", **kw)["Body"]
        try:
            return body.read()
        finally:
            body.close()
