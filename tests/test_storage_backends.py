"""A new scheme is one module: an object store registered with ``storage.backend.register``
is served by every public function of ``mtnlg.storage``, its requests retried by the one
policy (``ObjectStore.request``) without the store knowing of it."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest

from mtnlg import storage
from mtnlg.storage import backend
from mtnlg.storage.objects import ObjectStore, RangedReader

pytestmark = pytest.mark.unit


class MemoryStore(ObjectStore):
    """``mem://bucket/key`` in a dict; ``flaky`` requests answer with a reset connection first."""

    scheme = "mem://"

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.flaky = 0
        self.sent = 0

    def _send(self, fn):
        self.sent += 1
        if self.flaky:
            self.flaky -= 1
            raise ConnectionResetError("reset by the test")
        return fn()

    @contextlib.contextmanager
    def errors(self, uri):
        try:
            yield
        except KeyError:
            raise FileNotFoundError(uri) from None

    def bucket_exists(self, uri):
        return True

    def is_object(self, uri):
        return self.request("lookup", uri, lambda: self._send(lambda: uri in self.data))

    def objects(self, uri, prefix, limit=None):
        root = self.scheme + storage.split_uri(uri)[0] + "/"
        found = sorted((u[len(root):], len(b)) for u, b in self.data.items()
                       if u.startswith(root + prefix))
        return self.request("list", uri, lambda: self._send(lambda: found[:limit]))

    def size(self, path):
        return len(self.read_bytes(path))

    def read_bytes(self, path):
        return self.request("download", path, lambda: self._send(lambda: self.data[path]))

    def open_ranged(self, path):
        return _MemoryReader(self, path)

    def upload(self, local, path):
        with open(local, "rb") as f:
            content = f.read()
        self.request("upload", path, lambda: self._send(lambda: self.data.__setitem__(path, content)))

    def download(self, path, fileobj):
        fileobj.write(self.read_bytes(path))

    def delete_many(self, prefix, uris):
        for u in uris:
            self.request("delete", u, lambda u=u: self._send(lambda: self.data.pop(u, None)))


class _MemoryReader(RangedReader):
    def __init__(self, store, uri):
        super().__init__(store, uri, store.size(uri))

    def _fetch(self, start, end):
        return self._store._send(lambda: self._store.data[self.uri][start:end + 1])


@pytest.fixture
def mem(monkeypatch):
    monkeypatch.setenv("MTNLG_STORAGE_BACKOFF_S", "0.001")
    store = backend.register(MemoryStore())
    try:
        yield store
    finally:
        backend.unregister("mem://")


def test_a_registered_scheme_is_served_by_every_public_function(mem, tmp_path):
    assert storage.is_remote("mem://b/x") and not storage.is_remote(str(tmp_path))
    assert storage.split_uri("mem://b/a/c") == ("b", "a/c")
    storage.write_text("mem://b/run/a.txt", "alpha")
    storage.write_bytes("mem://b/run/sub/b.bin", b"\x00\x01\x02")
    assert storage.read_text("mem://b/run/a.txt") == "alpha"
    assert storage.exists("mem://b/run") and storage.isdir("mem://b/run") and not storage.exists("mem://b/none")
    assert storage.list_files("mem://b/run") == ["mem://b/run/a.txt", "mem://b/run/sub/b.bin"]
    assert storage.file_sizes("mem://b/run") == {"a.txt": 5, "sub/b.bin": 3}
    assert storage.glob("mem://b/run/**/*.bin") == ["mem://b/run/sub/b.bin"]
    assert storage.size("mem://b/run/sub/b.bin") == 3
    with storage.open_read("mem://b/run/a.txt", "r") as f:
        assert f.read() == "alpha"
    with storage.open_ranged("mem://b/run/a.txt") as f:
        f.seek(2)
        assert f.read(2) == b"ph"
    # copies to and from local paths and within the store, and a tree staged locally
    storage.copy("mem://b/run/a.txt", str(tmp_path / "a.txt"))
    assert (tmp_path / "a.txt").read_text() == "alpha"
    storage.copy(str(tmp_path / "a.txt"), "mem://b/copy/a.txt")
    storage.copy("mem://b/copy/a.txt", "mem://b/copy/again.txt")
    assert storage.read_text("mem://b/copy/again.txt") == "alpha"
    with storage.local_copy("mem://b/run") as local:
        assert sorted(p.name for p in Path(local).rglob("*") if p.is_file()) == ["a.txt", "b.bin"]
    storage.remove("mem://b/run")
    assert storage.list_files("mem://b/run") == [] and storage.exists("mem://b/copy/a.txt")
    with pytest.raises(FileNotFoundError, match="mem://b/run/a.txt"):
        storage.read_bytes("mem://b/run/a.txt")
    with pytest.raises(ValueError, match="is a mem:// URI, not a local path"):
        storage.local_path("mem://b/x")


def test_the_store_s_requests_are_retried_by_the_one_policy(mem, caplog):
    storage.write_text("mem://b/f.txt", "x")
    before = storage.retry_counts().get("ConnectionResetError", 0)
    mem.flaky, mem.sent = 2, 0
    with caplog.at_level(logging.WARNING, logger="mtnlg.storage"):
        assert storage.read_text("mem://b/f.txt") == "x"
    assert mem.sent == 3  # two resets, then the answer
    assert storage.retry_counts()["ConnectionResetError"] == before + 2
    assert [r.getMessage().split(" failed ")[0] for r in caplog.records] == ["mem://b/f.txt: download"] * 2
    mem.flaky = 100
    with pytest.raises(storage.RemoteStorageError, match="mem://b/f.txt: download failed 3 times"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MTNLG_STORAGE_ATTEMPTS", "3")
            storage.read_bytes("mem://b/f.txt")


def test_a_backend_must_implement_the_protocol():
    with pytest.raises(TypeError, match="does not implement"):
        backend.register(object())
    with pytest.raises(ValueError, match="ends with '://'"):
        store = MemoryStore()
        store.scheme = "mem:"
        backend.register(store)
    with pytest.raises(KeyError, match="no backend serves 'nope://'"):
        backend.unregister("nope://")
