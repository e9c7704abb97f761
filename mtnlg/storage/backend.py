"""The backend protocol every scheme implements, and the registry that maps a path to its
backend.

A backend serves one scheme (``gs://``, ``s3://``; ``""`` for local paths, the default)
and registers itself when its module is imported: ``register(MyStore())``. The public
functions of :mod:`mtnlg.storage` look the backend up with :func:`backend_for` and never
branch on the scheme. Object stores (a bucket of keys) derive from
:class:`mtnlg.storage.objects.ObjectStore`, which implements most of this protocol on a
handful of requests and wraps every request in the retry policy once.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import IO, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    """What the public functions of :mod:`mtnlg.storage` ask of a scheme. Paths are full
    paths or URIs of this backend's scheme; a missing file raises ``FileNotFoundError``."""

    scheme: str   # "gs://", "s3://"; "" for local paths
    remote: bool  # False only for local paths (the place remote content is staged)

    def exists(self, path: str) -> bool: ...
    def isdir(self, path: str) -> bool: ...
    def is_file(self, path: str) -> bool: ...
    def makedirs(self, path: str) -> None: ...
    def size(self, path: str) -> int: ...
    def list_files(self, path: str) -> list[str]: ...
    def file_sizes(self, path: str) -> dict[str, int]: ...
    def glob(self, pattern: str) -> list[str]: ...
    def open_read(self, path: str, mode: str) -> IO: ...
    def open_ranged(self, path: str) -> IO: ...
    def read_bytes(self, path: str) -> bytes: ...
    def atomic_write(self, path: str, mode: str) -> AbstractContextManager[IO]: ...
    def upload(self, local: str, path: str) -> None: ...       # a complete local file to ``path``
    def download(self, path: str, fileobj: IO) -> None: ...    # ``path``'s content into a binary file
    def copy(self, src: str, dst: str) -> None: ...            # both of this scheme
    def remove(self, path: str) -> None: ...
    def clear_cache(self) -> None: ...                         # forget cached clients


_remote: list[Backend] = []
_local: list[Backend] = []


def register(backend: Backend) -> Backend:
    """Serve ``backend.scheme`` with ``backend`` (the scheme ``""``: local paths)."""
    if not isinstance(backend, Backend):
        raise TypeError(f"{type(backend).__name__} does not implement mtnlg.storage.backend.Backend")
    if not backend.scheme:
        _local[:] = [backend]
        return backend
    if not backend.scheme.endswith("://"):
        raise ValueError(f"a backend's scheme ends with '://', got {backend.scheme!r}")
    _remote[:] = [b for b in _remote if b.scheme != backend.scheme] + [backend]
    return backend


def unregister(scheme: str) -> None:
    """Stop serving ``scheme`` (a remote one; local paths always have a backend)."""
    if scheme not in remote_schemes():
        raise KeyError(f"no backend serves {scheme!r}; registered: {remote_schemes()}")
    _remote[:] = [b for b in _remote if b.scheme != scheme]


def backends() -> list[Backend]:
    """Every registered backend, local first."""
    return _local + _remote


def remote_schemes() -> list[str]:
    return [b.scheme for b in _remote]


def backend_for(path: str | os.PathLike) -> Backend:
    """The backend that serves ``path``: the one whose scheme it starts with, else local."""
    path = str(path)
    for b in _remote:
        if path.startswith(b.scheme):
            return b
    if not _local:
        raise RuntimeError("no backend serves local paths: import mtnlg.storage, not one of its modules")
    return _local[0]


def is_remote(path: str | os.PathLike) -> bool:
    """A ``gs://`` or ``s3://`` URI (any registered scheme): not a local path (stage it
    locally, upload it)."""
    return backend_for(path).remote


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` or ``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    for scheme in remote_schemes():
        if uri.startswith(scheme):
            bucket, _, key = uri[len(scheme):].partition("/")
            if not bucket:
                raise ValueError(f"{scheme} URI without a bucket: {uri!r}")
            return bucket, key
    raise ValueError(f"not a {' or '.join(remote_schemes())} URI: {uri!r}")
