"""``gs://bucket/key``: Google Cloud Storage through google-cloud-storage (set
``STORAGE_EMULATOR_HOST`` to talk to an emulator, as the tests do; the client is then
anonymous). The library's own retries are off (``retry=None``): :class:`ObjectStore`
retries each request."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import IO

from .backend import register, split_uri
from .errors import BucketNotFoundError, RemoteStorageError
from .objects import ObjectStore, RangedReader
from .retry import _rewind, retry_policy, timeout_s

GS = "gs://"
_GCS_BATCH = 100     # deletions per GCS batch request (the JSON API's limit)


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith(GS)


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    return split_uri(uri)


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


class GCSStore(ObjectStore):
    scheme = GS

    def _error(self, uri: str, e: Exception) -> Exception | None:
        """The exception to raise for google-cloud-storage's ``e`` on ``uri`` (None: leave it)."""
        from google.api_core import exceptions as gexc

        if isinstance(e, gexc.NotFound):
            bucket = split_uri(uri)[0]
            try:
                there = self.retried("bucket lookup", uri, lambda: gcs_client().bucket(bucket).exists(
                    retry=None, timeout=timeout_s()))
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
    def errors(self, uri: str) -> Iterator[None]:
        try:
            yield
        except (RemoteStorageError, FileNotFoundError, PermissionError):
            raise
        except Exception as e:
            mapped = self._error(uri, e)
            if mapped is None:
                raise
            raise mapped from e

    def bucket_exists(self, uri: str) -> bool:
        bucket = split_gcs(uri)[0]
        return self.request("bucket lookup", uri, lambda: gcs_client().bucket(bucket).exists(
            retry=None, timeout=timeout_s()))

    def is_object(self, uri: str) -> bool:
        return self.request("lookup", uri, lambda: _blob(uri).exists(retry=None, timeout=timeout_s()))

    def objects(self, uri: str, prefix: str, limit: int | None = None) -> list[tuple[str, int]]:
        """The whole listing, fetched again if a page fails."""
        bucket = split_gcs(uri)[0]
        t = timeout_s()
        return self.request("list", uri, lambda: [(b.name, int(b.size or 0)) for b in gcs_client().list_blobs(
            bucket, prefix=prefix, max_results=limit, retry=None, timeout=t)])

    def stat(self, uri: str) -> tuple[int, int | None]:
        """``(size, generation)`` of an object."""
        blob = _blob(uri)
        self.request("stat", uri, lambda: blob.reload(retry=None, timeout=timeout_s()))
        return int(blob.size), blob.generation

    def size(self, path: str) -> int:
        return self.stat(path)[0]

    def read_bytes(self, path: str) -> bytes:
        return self.request("download", path, lambda: _blob(path).download_as_bytes(retry=None, timeout=timeout_s()))

    def open_ranged(self, path: str) -> IO:
        return _GCSReader(path)

    def upload(self, local: str, path: str) -> None:
        self.request("upload", path, lambda: _blob(path).upload_from_filename(local, retry=None, timeout=timeout_s()))

    def download(self, path: str, fileobj: IO) -> None:
        self.request("download", path, lambda: _blob(path).download_to_file(fileobj, retry=None, timeout=timeout_s()),
                     reset=_rewind(fileobj))

    def delete(self, uri: str) -> None:
        from google.api_core import exceptions as gexc

        def delete() -> None:
            try:
                _blob(uri).delete(retry=None, timeout=timeout_s())
            except gexc.NotFound:
                pass  # gone already (an earlier attempt's answer was lost)

        self.request("delete", uri, delete)

    def delete_many(self, prefix: str, uris: list[str]) -> None:
        """One object: one request. More: batch requests of 100; whatever a failed or
        cut-off batch left is found again by listing and deleted in the next round."""
        if len(uris) == 1:
            self.delete(uris[0])
            return
        bucket = split_gcs(prefix)[0]
        wanted = set(uris)
        remaining = uris
        for _ in range(retry_policy().attempts):
            def batches(remaining: list[str] = remaining) -> None:
                client = gcs_client()
                for i in range(0, len(remaining), _GCS_BATCH):
                    with client.batch():
                        for u in remaining[i:i + _GCS_BATCH]:
                            client.bucket(bucket).blob(split_gcs(u)[1]).delete(retry=None, timeout=timeout_s())

            try:
                self.request("delete", prefix, batches)
            except FileNotFoundError:
                pass  # some object was gone already (an earlier answer lost): list what is left
            remaining = [u for u in self.list_files(prefix) if u in wanted]
            if not remaining:
                return
        raise RemoteStorageError(f"{prefix}: {len(remaining)} objects still there after deleting "
                                 f"{retry_policy().attempts} times (first: {remaining[0]})")

    def clear_cache(self) -> None:
        _client_for.cache_clear()


STORE = register(GCSStore())


class _GCSReader(RangedReader):
    """Ranged reads of one generation of a GCS object."""

    def __init__(self, uri: str):
        size, self._generation = STORE.stat(uri)
        super().__init__(STORE, uri, size)
        self._blob = _blob(uri)

    def _fetch(self, start: int, end: int) -> bytes:
        kw = {"if_generation_match": self._generation} if self._generation else {}
        return self._blob.download_as_bytes(start=start, end=end, retry=None, timeout=timeout_s(), checksum=None, **kw)
