"""One way to read, write, list and glob local paths and ``gs://`` URIs.

Local paths use the filesystem; ``gs://bucket/key`` uses google-cloud-storage (set
``STORAGE_EMULATOR_HOST`` to talk to an emulator, as the tests do). Writes are atomic:
locally a temporary file in the same directory is renamed over the final name; on GCS an
object only becomes visible when its upload completes.

    from mtnlg import storage
    with storage.atomic_write("gs://bucket/out/stats.json", "w") as f:
        f.write("{}")
    storage.read_text("gs://bucket/out/stats.json")
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob as _glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

GS = "gs://"


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith(GS)


def split_gcs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    rest = uri[len(GS):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"gs:// URI without a bucket: {uri!r}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_gcs(base):
        out = base.rstrip("/")
        for p in parts:
            out = out + "/" + str(p).strip("/")
        return out
    return os.path.join(base, *parts)


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


def exists(path: str | os.PathLike) -> bool:
    path = str(path)
    if is_gcs(path):
        bucket, key = split_gcs(path)
        if not key:
            return gcs_client().bucket(bucket).exists()
        if _blob(path).exists():
            return True
        return isdir(path)
    return os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    """Local: a directory. GCS: some object lies under ``path/``."""
    path = str(path)
    if is_gcs(path):
        bucket, key = split_gcs(path)
        prefix = key.rstrip("/") + "/" if key else ""
        it = gcs_client().list_blobs(bucket, prefix=prefix, max_results=1)
        return any(True for _ in it)
    return os.path.isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """Create a local directory (and parents); a no-op for gs:// (no directories there)."""
    if not is_gcs(path):
        os.makedirs(str(path), exist_ok=True)


def open_read(path: str | os.PathLike, mode: str = "rb") -> IO:
    """Open a file for reading; ``mode`` is ``"rb"`` or ``"r"`` (UTF-8)."""
    path = str(path)
    if mode not in ("rb", "r"):
        raise ValueError(f"open_read mode must be 'rb' or 'r', got {mode!r}")
    if is_gcs(path):
        blob = _blob(path)
        if mode == "r":
            return blob.open("rt", encoding="utf-8")
        return blob.open("rb")
    if mode == "r":
        return open(path, "r", encoding="utf-8")
    return open(path, "rb")


def read_bytes(path: str | os.PathLike) -> bytes:
    path = str(path)
    if is_gcs(path):
        from google.api_core import exceptions

        try:
            return _blob(path).download_as_bytes()
        except exceptions.NotFound:
            raise FileNotFoundError(path) from None
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` so that no partial file is ever visible under its final name.

    If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    path = str(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    kw = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    if is_gcs(path):
        fd, tmp = tempfile.mkstemp(prefix=".mtnlg-upload-")
        os.close(fd)
        try:
            with open(tmp, mode, **kw) as f:
                yield f
            _blob(path).upload_from_filename(tmp)
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
        blob = _blob(path)
        blob.reload()
        return int(blob.size)
    return os.path.getsize(path)


def list_files(path: str | os.PathLike) -> list[str]:
    """All files under a directory (recursively), sorted; a file path returns itself."""
    path = str(path)
    if is_gcs(path):
        bucket, key = split_gcs(path)
        if key and _blob(path).exists():
            return [path]
        prefix = key.rstrip("/") + "/" if key else ""
        return sorted(f"{GS}{bucket}/{b.name}" for b in gcs_client().list_blobs(bucket, prefix=prefix)
                      if not b.name.endswith("/"))
    if os.path.isfile(path):
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in files)
    return sorted(out)


def glob(pattern: str) -> list[str]:
    """Files matching a glob (``*``, ``?``, ``[...]``, ``**``), local or gs://, sorted."""
    if is_gcs(pattern):
        bucket, key = split_gcs(pattern)
        first_wild = min([i for i in (key.find(c) for c in "*?[") if i >= 0], default=len(key))
        prefix = key[:first_wild]
        names = (b.name for b in gcs_client().list_blobs(bucket, prefix=prefix))
        rx = _glob_regex(key)
        return sorted(f"{GS}{bucket}/{n}" for n in names if rx.fullmatch(n) and not n.endswith("/"))
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
    """Files named by paths, directories and globs (local or gs://), in order, deduplicated.

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
    if not is_gcs(src) and not is_gcs(dst):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        with open(src, "rb") as fi, atomic_write(dst) as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        return
    if is_gcs(dst) and not is_gcs(src):
        _blob(dst).upload_from_filename(src)
        return
    if is_gcs(src) and not is_gcs(dst):
        with atomic_write(dst) as fo:
            _blob(src).download_to_file(fo)
        return
    write_bytes(dst, read_bytes(src))


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
    """Remove a file or a whole directory / gs:// prefix."""
    if is_gcs(path):
        for f in list_files(path):
            _blob(f).delete()
        return
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding ``path``'s content (a download for gs://, the path itself locally)."""
    if not is_gcs(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mtnlg-") as d:
        local = os.path.join(d, os.path.basename(path.rstrip("/")) or "object")
        if isdir(path) and not _blob(path).exists():
            copy_tree(path, local)
        else:
            copy(path, local)
        yield local


@contextlib.contextmanager
def local_dir_for_output(path: str) -> Iterator[str]:
    """A local directory to write into; for gs:// it is uploaded to ``path`` on success."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mtnlg-out-") as d:
        yield d
        copy_tree(d, path)


def local_path(path: str | os.PathLike) -> Path:
    if is_gcs(path):
        raise ValueError(f"{path} is a gs:// URI, not a local path")
    return Path(path)
