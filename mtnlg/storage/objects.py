"""What every object store (a bucket of keys: ``gs://``, ``s3://``) does the same way, on
top of a handful of requests its backend sends: existence, listings, globs, reads, atomic
writes, copies and removal. Each request goes through :meth:`ObjectStore.request`, which
maps the store's errors to the documented ones and applies the retry policy (:mod:`.retry`)
once; a backend only says how to send one request and how to read its errors.
"""

from __future__ import annotations

import abc
import contextlib
import fnmatch
import io
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import IO

from .backend import split_uri
from .retry import _ShortRead, _with_retries

_READ_BUFFER = 4 << 20  # read-ahead of open_read (larger reads go straight to a ranged GET)


class ObjectStore(abc.ABC):
    """A bucket-of-keys store. Subclasses set ``scheme`` and implement the abstract
    requests, each sent through :meth:`request` (or :meth:`retried`, unmapped)."""

    scheme: str
    remote = True

    # ------------------------------------------------------------------ the requests

    @abc.abstractmethod
    def errors(self, uri: str) -> contextlib.AbstractContextManager:
        """A context that turns the client library's errors into ``FileNotFoundError``
        (:class:`BucketNotFoundError` for a missing bucket), ``PermissionError`` and
        :class:`RemoteStorageError`, each naming ``uri``."""

    @abc.abstractmethod
    def bucket_exists(self, uri: str) -> bool:
        """Whether the bucket of ``uri`` exists."""

    @abc.abstractmethod
    def is_object(self, uri: str) -> bool:
        """Whether an object is named ``uri`` (a URI with a key; a missing bucket is not checked)."""

    @abc.abstractmethod
    def objects(self, uri: str, prefix: str, limit: int | None = None) -> Iterable[tuple[str, int]]:
        """``(key, size)`` of the objects under ``prefix`` in ``uri``'s bucket, in key order."""

    @abc.abstractmethod
    def size(self, path: str) -> int: ...

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes: ...

    @abc.abstractmethod
    def open_ranged(self, path: str) -> IO:
        """A :class:`RangedReader` of the object as it is now."""

    @abc.abstractmethod
    def upload(self, local: str, path: str) -> None:
        """Upload a complete local file: the object appears only when the upload completes."""

    @abc.abstractmethod
    def download(self, path: str, fileobj: IO) -> None: ...

    @abc.abstractmethod
    def delete_many(self, prefix: str, uris: list[str]) -> None:
        """Delete ``uris`` (all under ``prefix``, at least one), in bulk where the store can."""

    def clear_cache(self) -> None:
        """Forget cached clients."""

    # ------------------------------------------------------------------ retries, once

    def retried(self, what: str, uri: str, fn, reset=None):
        """``fn()`` (one request), retried as the policy says; its errors left as they are."""
        return _with_retries(what, uri, fn, reset)

    def request(self, what: str, uri: str, fn, reset=None, **mapping):
        """``fn()`` (one request), retried as the policy says, with the store's errors mapped
        (``mapping``: options of :meth:`errors`)."""
        with self.errors(uri, **mapping):
            return _with_retries(what, uri, fn, reset)

    # ------------------------------------------------------------------ the protocol

    def exists(self, path: str) -> bool:
        if not split_uri(path)[1]:
            return self.bucket_exists(path)
        if self.is_object(path):
            return True
        return self.isdir(path)  # a missing bucket raises here

    def isdir(self, path: str) -> bool:
        """Some object lies under ``path/``."""
        return any(True for _ in self.objects(path, _dir_prefix(path), limit=1))

    def makedirs(self, path: str) -> None:
        """Nothing: an object store has no directories."""

    def is_file(self, path: str) -> bool:
        """An object is named ``path`` (a bucket alone is not one)."""
        return bool(split_uri(path)[1]) and self.is_object(path)

    def list_files(self, path: str) -> list[str]:
        if self.is_file(path):
            return [path]
        bucket = split_uri(path)[0]
        return sorted(f"{self.scheme}{bucket}/{n}" for n, _ in self.objects(path, _dir_prefix(path))
                      if not n.endswith("/"))

    def file_sizes(self, path: str) -> dict[str, int]:
        prefix = _dir_prefix(path)
        return {n[len(prefix):]: size for n, size in self.objects(path, prefix) if not n.endswith("/")}

    def glob(self, pattern: str) -> list[str]:
        bucket, key = split_uri(pattern)
        first_wild = min([i for i in (key.find(c) for c in "*?[") if i >= 0], default=len(key))
        rx = _glob_regex(key)
        return sorted(f"{self.scheme}{bucket}/{n}" for n, _ in self.objects(pattern, key[:first_wild])
                      if rx.fullmatch(n) and not n.endswith("/"))

    def open_read(self, path: str, mode: str) -> IO:
        f = io.BufferedReader(self.open_ranged(path), buffer_size=_READ_BUFFER)
        return io.TextIOWrapper(f, encoding="utf-8") if mode == "r" else f

    @contextlib.contextmanager
    def atomic_write(self, path: str, mode: str) -> Iterator[IO]:
        """Stage the content in a local temporary file, uploaded whole once the body is
        done; nothing is uploaded if it raises."""
        kw = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        fd, tmp = tempfile.mkstemp(prefix=".mtnlg-upload-")
        os.close(fd)
        try:
            with open(tmp, mode, **kw) as f:
                yield f
            self.upload(tmp, path)
        finally:
            os.unlink(tmp)

    def copy(self, src: str, dst: str) -> None:
        """Within this store: downloaded and uploaded whole (a store with a server-side
        copy overrides this)."""
        data = self.read_bytes(src)
        with self.atomic_write(dst, "wb") as f:
            f.write(data)

    def remove(self, path: str) -> None:
        files = self.list_files(path)
        if files:
            self.delete_many(path, files)


def _dir_prefix(uri: str) -> str:
    key = split_uri(uri)[1]
    return key.rstrip("/") + "/" if key else ""


def _glob_regex(pattern: str) -> re.Pattern:
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


class RangedReader(io.RawIOBase):
    """A seekable read-only view of one object: every read is a ranged request for the
    object as it was when opened (a replaced object fails instead of mixing two), retried
    on its own; a short answer (a cut connection) is asked for again. A backend implements
    :meth:`_fetch`."""

    name: str

    def __init__(self, store: ObjectStore, uri: str, size: int):
        self._store = store
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

        data = self._store.request("read", self.uri, fetch)
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self._get(len(b))
        b[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self._get(self._size - self._pos)
