"""One way to read, write, list and glob local paths, ``gs://`` and ``s3://`` URIs.

Every public function looks up the backend of its path (:func:`backend.backend_for`) and
asks it through one protocol (:class:`backend.Backend`); none branches on the scheme.
``local.py`` serves local paths, ``gcs.py`` ``gs://`` (google-cloud-storage; set
``STORAGE_EMULATOR_HOST`` to talk to an emulator, as the tests do), ``s3.py`` ``s3://``
(boto3; any S3-compatible store, its settings from the environment as that module says).
``objects.py`` is what object stores share, and where every request they send is retried
(``retry.py``: the policy). A new scheme is a new module here that registers its backend.

Writes are atomic: locally a temporary file in the same directory is renamed over the
final name; on GCS and S3 the content is staged in a local temporary file and uploaded to
the final name only when complete, and an object only becomes visible when its upload
completes (S3 PUT and multipart-complete are atomic), so no partial object is ever
visible under a final name.

    from mtnlg import storage
    with storage.atomic_write("gs://bucket/out/stats.json", "w") as f:
        f.write("{}")
    storage.read_text("s3://bucket/out/stats.json")

MinIO, e.g. the one Kubeflow Pipelines installs (bucket ``mlpipeline``, credentials in the
secret ``mlpipeline-minio-artifact``, keys ``accesskey``/``secretkey``)::

    export AWS_ENDPOINT_URL_S3=http://minio-service.kubeflow:9000
    export AWS_ACCESS_KEY_ID=minio AWS_SECRET_ACCESS_KEY=minio123 AWS_DEFAULT_REGION=us-east-1
    mtnlg train ... data.path=s3://mlpipeline/tokens output=s3://mlpipeline/runs/gpt

KFP's own ``minio://`` artifact URIs are not read here (the endpoint cannot be told from
the URI); use the ``s3://`` URI of the same bucket and key with the endpoint set.

Retries (``retry.py``): every request to a store that fails in a way that may pass is sent
again with bounded exponential backoff and jitter, up to ``MTNLG_STORAGE_ATTEMPTS``
attempts, each retry logged as a warning on the ``mtnlg.storage`` logger; the client
libraries' own retries are off, and Python's global ``random`` is left as it was found.
Every retried operation is idempotent: an upload sends the whole object again, a read asks
again for the same byte range of the same object generation (GCS) or ETag (S3), a delete
of something already gone succeeds. A permanent error is never retried.

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
import importlib
import os
import pkgutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

# ``x as x``: private names reached from outside as ``storage._x`` (the tests' fixtures and
# white-box checks), and ``storage.log``, the "mtnlg.storage" logger each retry warns on
from .backend import backend_for, backends, is_remote, split_uri
from .errors import BucketNotFoundError, RemoteStorageError
from .gcs import GS, gcs_client, is_gcs, split_gcs
from .gcs import _client_for as _client_for
from .gcs import _GCSReader as _GCSReader
from .local import write_failure_hint
from .retry import RetryPolicy, retry_counts, retry_policy
from .retry import log as log
from .s3 import _S3_CHUNK as _S3_CHUNK
from .s3 import S3, is_s3, s3_client, s3_endpoint, split_s3
from .s3 import _S3Reader as _S3Reader

# every module of this package that serves a scheme registers its backend when imported
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = [
    "BucketNotFoundError", "GS", "RemoteStorageError", "RetryPolicy", "S3", "atomic_write", "clear_client_cache",
    "copy", "copy_tree", "exists", "expand", "file_sizes", "gcs_client", "glob", "has_glob", "is_gcs", "is_remote",
    "is_s3", "isdir", "join", "list_files", "local_copy", "local_dir_for_output", "local_path", "makedirs",
    "open_ranged", "open_read", "read_bytes", "read_text", "remove", "retry_counts", "retry_policy", "s3_client",
    "s3_endpoint", "size", "split_gcs", "split_s3", "split_uri", "write_bytes", "write_failure_hint", "write_text",
]


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        out = base.rstrip("/")
        for p in parts:
            out = out + "/" + str(p).strip("/")
        return out
    return os.path.join(base, *parts)


def exists(path: str | os.PathLike) -> bool:
    path = str(path)
    return backend_for(path).exists(path)


def isdir(path: str | os.PathLike) -> bool:
    """Local: a directory. GCS, S3: some object lies under ``path/``."""
    path = str(path)
    return backend_for(path).isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """Create a local directory (and parents); a no-op for gs:// and s3:// (no directories there)."""
    path = str(path)
    backend_for(path).makedirs(path)


def open_read(path: str | os.PathLike, mode: str = "rb") -> IO:
    """Open a file for reading; ``mode`` is ``"rb"`` or ``"r"`` (UTF-8). Seekable; on
    gs:// and s3:// reads are ranged requests."""
    path = str(path)
    if mode not in ("rb", "r"):
        raise ValueError(f"open_read mode must be 'rb' or 'r', got {mode!r}")
    return backend_for(path).open_read(path, mode)


def read_bytes(path: str | os.PathLike) -> bytes:
    path = str(path)
    return backend_for(path).read_bytes(path)


def open_ranged(path: str | os.PathLike) -> IO:
    """A seekable, unbuffered binary reader: on gs:// and s3:// every ``read(n)`` is one
    ranged request for exactly those bytes of the object as it was when opened (retried;
    refused if the object changed since); a plain file locally."""
    path = str(path)
    return backend_for(path).open_ranged(path)


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
    with backend_for(path).atomic_write(path, mode) as f:
        yield f


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def size(path: str | os.PathLike) -> int:
    path = str(path)
    return backend_for(path).size(path)


def list_files(path: str | os.PathLike) -> list[str]:
    """All files under a directory (recursively), sorted; a file path returns itself."""
    path = str(path)
    return backend_for(path).list_files(path)


def file_sizes(path: str | os.PathLike) -> dict[str, int]:
    """The size of every file under a directory (recursively), by name relative to it, from
    one listing (no request per file on gs:// and s3://)."""
    path = str(path)
    return backend_for(path).file_sizes(path)


def glob(pattern: str) -> list[str]:
    """Files matching a glob (``*``, ``?``, ``[...]``, ``**``), local, gs:// or s3://, sorted."""
    return backend_for(pattern).glob(pattern)


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
    source, target = backend_for(src), backend_for(dst)
    if source is target:  # S3 copies server-side
        source.copy(src, dst)
    elif not source.remote:
        with open(src, "rb"):
            pass  # the usual FileNotFoundError / IsADirectoryError, before any request
        target.upload(src, dst)
    elif not target.remote:
        with atomic_write(dst) as fo:
            source.download(src, fo)
    else:  # between two stores: through a local temporary file, uploaded once complete
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


def remove(path: str) -> None:
    """Remove a file or a whole directory / gs:// or s3:// prefix; a prefix's objects go in
    bulk (GCS batch requests of 100, S3 DeleteObjects of 1000), so pruning a checkpoint of
    thousands of shards takes tens of requests, not thousands."""
    path = str(path)
    backend_for(path).remove(path)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding ``path``'s content (a download for gs:// and s3://, the path
    itself locally)."""
    b = backend_for(path)
    if not b.remote:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mtnlg-") as d:
        local = os.path.join(d, os.path.basename(path.rstrip("/")) or "object")
        if b.isdir(path) and not b.is_file(path):
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
    b = backend_for(path)
    if b.remote:
        raise ValueError(f"{path} is a {b.scheme} URI, not a local path")
    return Path(path)


def clear_client_cache() -> None:
    """Forget the cached clients of every store (after changing the environment, in tests)."""
    for b in backends():
        b.clear_cache()
