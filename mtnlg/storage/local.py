"""Local paths: the filesystem. Writes are atomic: a temporary file in the same directory,
flushed to disk, is renamed over the final name."""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

from .backend import is_remote, register


class LocalFiles:
    """The default backend: any path no registered scheme claims."""

    scheme = ""
    remote = False

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def is_file(self, path: str) -> bool:
        return os.path.isfile(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def list_files(self, path: str) -> list[str]:
        if os.path.isfile(path):
            return [path]
        out = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            out.extend(os.path.join(root, f) for f in files)
        return sorted(out)

    def file_sizes(self, path: str) -> dict[str, int]:
        out = {}
        for root, _dirs, files in os.walk(path):
            for f in files:
                full = os.path.join(root, f)
                out[os.path.relpath(full, path).replace(os.sep, "/")] = os.path.getsize(full)
        return out

    def glob(self, pattern: str) -> list[str]:
        return sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))

    def open_read(self, path: str, mode: str) -> IO:
        if mode == "r":
            return open(path, "r", encoding="utf-8")
        return open(path, "rb")

    def open_ranged(self, path: str) -> IO:
        return open(path, "rb", buffering=0)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    @contextlib.contextmanager
    def atomic_write(self, path: str, mode: str) -> Iterator[IO]:
        kw = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
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

    def upload(self, local: str, path: str) -> None:
        self.copy(local, path)

    def download(self, path: str, fileobj: IO) -> None:
        with open(path, "rb") as fi:
            shutil.copyfileobj(fi, fileobj, 1 << 20)

    def copy(self, src: str, dst: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        with open(src, "rb") as fi, self.atomic_write(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)

    def remove(self, path: str) -> None:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    def clear_cache(self) -> None:
        """Nothing cached."""


register(LocalFiles())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
