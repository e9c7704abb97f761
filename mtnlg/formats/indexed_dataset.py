"""Token files in Megatron-LM's ``MMapIndexedDataset`` format: ``<prefix>.bin`` + ``<prefix>.idx``.

``.bin`` is every document's tokens back to back, in one integer dtype. ``.idx`` is, all
little-endian::

    offset  size  field
    0       9     magic b"MMIDIDX\\x00\\x00"
    9       8     version, uint64 = 1
    17      1     dtype code, uint8 (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                  6 float64, 7 float32, 8 uint16)
    18      8     sequence count N, uint64
    26      8     document count M, uint64 (= documents + 1)
    34      4N    sequence lengths in tokens, int32
    ...     8N    sequence pointers: byte offsets into .bin, int64
    ...     8M    document indices: the first sequence of each document, then N, int64

Every document here is one sequence, so the document indices are ``0, 1, ..., N``.
Megatron-LM's ``IndexedDataset`` (and ``tools/preprocess_data.py``) read and write the same
bytes, so files go both ways unchanged.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                           6: np.float64, 7: np.float32, 8: np.uint16}
CODES: dict[np.dtype, int] = {np.dtype(t): c for c, t in DTYPES.items()}

_CHUNK = 1 << 20  # entries per chunk when streaming the index


def data_path(prefix: str) -> str:
    return str(prefix) + ".bin"


def index_path(prefix: str) -> str:
    return str(prefix) + ".idx"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron uses for ids < ``vocab_size``: uint16 when they fit, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in CODES:
        raise ValueError(f"dtype {dt} has no Megatron indexed-dataset code; use one of "
                         f"{sorted(str(np.dtype(t)) for t in DTYPES.values())}")
    return CODES[dt]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _strip_suffix(prefix: str) -> str:
    prefix = str(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


class IndexedDatasetBuilder:
    """Streams documents into ``<prefix>.bin``; ``finalize()`` writes ``<prefix>.idx``.

    Memory stays constant in the corpus size: tokens go straight to a temporary ``.bin`` and
    lengths to a temporary side file, from which the index is written in chunks. Both final
    names appear only at ``finalize()`` (``.bin`` first, so a visible ``.idx`` always has its
    data); on error, or ``abort()``, nothing is left behind.

        with IndexedDatasetBuilder("out/train", np.uint16) as b:
            b.add_document([5, 6, 2])
            b.add_documents(tokens, lengths)   # many at once: flat tokens + per-document lengths
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = _strip_suffix(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._lo, self._hi = (info.min, info.max) if info else (None, None)
        directory = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(directory, exist_ok=True)
        base = os.path.basename(self.prefix)
        self._bin_tmp = self._mktemp(directory, base + ".bin.")
        self._len_tmp = self._mktemp(directory, base + ".lengths.")
        self._bin = open(self._bin_tmp, "wb")
        self._lens = open(self._len_tmp, "wb")
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    @staticmethod
    def _mktemp(directory: str, prefix: str) -> str:
        fd, path = tempfile.mkstemp(prefix="." + prefix, suffix=".tmp", dir=directory)
        os.close(fd)
        return path

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        self.add_documents(arr.reshape(-1), np.array([arr.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``len(lengths)`` documents whose tokens lie back to back in ``tokens``."""
        if self._done:
            raise ValueError(f"{self.prefix}: builder already finalized or aborted")
        lengths = np.asarray(lengths)
        tokens = np.asarray(tokens).reshape(-1)
        if lengths.ndim != 1:
            raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
        total = int(lengths.sum(dtype=np.int64))
        if total != tokens.size:
            raise ValueError(f"lengths sum to {total} but {tokens.size} tokens were given")
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("a document length is negative or exceeds int32")
        if tokens.dtype != self.dtype:
            if tokens.size and self._lo is not None and (tokens.min() < self._lo or tokens.max() > self._hi):
                raise ValueError(f"token ids {int(tokens.min())}..{int(tokens.max())} do not fit "
                                 f"{self.dtype} of {self.prefix}")
            tokens = tokens.astype(self.dtype)
        self._bin.write(np.ascontiguousarray(tokens).data)
        self._lens.write(lengths.astype("<i4").data)
        self.num_documents += int(lengths.size)
        self.num_tokens += total

    def finalize(self) -> None:
        """Write ``.idx`` and move both files to their final names."""
        if self._done:
            raise ValueError(f"{self.prefix}: builder already finalized or aborted")
        self._done = True
        idx_tmp = None
        try:
            self._close(self._bin)
            self._close(self._lens)
            directory = os.path.dirname(os.path.abspath(self.prefix))
            idx_tmp = self._mktemp(directory, os.path.basename(self.prefix) + ".idx.")
            n = self.num_documents
            with open(idx_tmp, "wb") as f:
                f.write(MAGIC)
                f.write(struct.pack("<Q", VERSION))
                f.write(struct.pack("<B", self._code))
                f.write(struct.pack("<Q", n))
                f.write(struct.pack("<Q", n + 1))
                lens = np.memmap(self._len_tmp, dtype="<i4", mode="r") if n else np.empty(0, "<i4")
                for s in range(0, n, _CHUNK):  # sequence lengths
                    f.write(np.ascontiguousarray(lens[s:s + _CHUNK]).data)
                offset = 0
                item = self.dtype.itemsize
                for s in range(0, n, _CHUNK):  # sequence pointers: exclusive cumsum, in bytes
                    nbytes = lens[s:s + _CHUNK].astype(np.int64) * item
                    ptr = np.cumsum(nbytes) - nbytes + offset
                    offset += int(nbytes.sum())
                    f.write(ptr.astype("<i8").data)
                for s in range(0, n + 1, _CHUNK):  # document indices 0..n
                    f.write(np.arange(s, min(s + _CHUNK, n + 1), dtype="<i8").data)
                del lens
                f.flush()
                os.fsync(f.fileno())
            mode = 0o666 & ~_umask()  # mkstemp files are private; finished ones follow the umask
            os.chmod(self._bin_tmp, mode)
            os.chmod(idx_tmp, mode)
            os.replace(self._bin_tmp, data_path(self.prefix))
            os.replace(idx_tmp, index_path(self.prefix))
            idx_tmp = None
        except BaseException:
            self._cleanup(idx_tmp)
            raise
        self._cleanup(None)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._cleanup(None)

    @staticmethod
    def _close(f) -> None:
        if not f.closed:
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def _cleanup(self, idx_tmp: str | None) -> None:
        for f in (self._bin, self._lens):
            if not f.closed:
                f.close()
        for p in (self._bin_tmp, self._len_tmp, idx_tmp):
            if p:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()


class IndexedDataset:
    """Read-only, memory-mapped view of ``<prefix>.bin`` / ``<prefix>.idx`` (local paths).

    ``ds[i]`` is document ``i`` as a zero-copy array; ``ds.get(i, offset, length)`` a token
    range of it. Opening checks the header and that both files have exactly the sizes the
    header implies, so a truncated copy or a foreign file fails here, naming the file.
    """

    def __init__(self, prefix: str):
        self.prefix = _strip_suffix(prefix)
        idx, data = index_path(self.prefix), data_path(self.prefix)
        for p in (idx, data):
            if not os.path.exists(p):
                raise FileNotFoundError(f"indexed dataset file {p} does not exist")
        idx_size = os.path.getsize(idx)
        if idx_size < HEADER_SIZE:
            raise ValueError(f"{idx} is truncated: {idx_size} bytes, shorter than the "
                             f"{HEADER_SIZE}-byte header")
        with open(idx, "rb") as f:
            header = f.read(HEADER_SIZE)
        magic = header[:9]
        if magic != MAGIC:
            raise ValueError(f"{idx} is not a Megatron indexed-dataset index: magic {magic!r}, "
                             f"expected {MAGIC!r}")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise ValueError(f"{idx}: unsupported index version {version} (expected {VERSION})")
        code = header[17]
        if code not in DTYPES:
            raise ValueError(f"{idx}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        n, m = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 4 * n + 8 * n + 8 * m
        if idx_size < expected:
            raise ValueError(f"{idx} is truncated: {idx_size} bytes, but its header "
                             f"({n} sequences, {m} document indices) needs {expected}")
        if idx_size > expected:
            raise ValueError(f"{idx} has {idx_size - expected} unexpected bytes after its document "
                             f"indices ({n} sequences, {m} document indices need {expected} bytes)")
        if m < 1:
            raise ValueError(f"{idx}: document count is 0; a valid index has at least one entry")
        self._idx_mmap = np.memmap(idx, dtype=np.uint8, mode="r")
        off = HEADER_SIZE
        self.sizes = np.frombuffer(self._idx_mmap, dtype="<i4", count=n, offset=off)
        off += 4 * n
        self.pointers = np.frombuffer(self._idx_mmap, dtype="<i8", count=n, offset=off)
        off += 8 * n
        self.doc_idx = np.frombuffer(self._idx_mmap, dtype="<i8", count=m, offset=off)
        if self.doc_idx[0] != 0 or self.doc_idx[-1] != n:
            raise ValueError(f"{idx}: document indices must run from 0 to {n}, "
                             f"got {int(self.doc_idx[0])}..{int(self.doc_idx[-1])}")
        item = self.dtype.itemsize
        expected_bin = int(self.pointers[-1]) + int(self.sizes[-1]) * item if n else 0
        if n and self.pointers[0] != 0:
            raise ValueError(f"{idx}: the first sequence pointer is {int(self.pointers[0])}, not 0")
        bin_size = os.path.getsize(data)
        if bin_size != expected_bin:
            what = "is truncated" if bin_size < expected_bin else "is longer than its index says"
            raise ValueError(f"{data} {what}: {bin_size} bytes, but {idx} describes {expected_bin}")
        if bin_size:
            self.tokens = np.memmap(data, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.empty(0, dtype=self.dtype)
        self.num_tokens = bin_size // item

    def check(self) -> None:
        """Full O(N) consistency check: lengths non-negative, pointers their running sum."""
        if self.sizes.size and self.sizes.min() < 0:
            raise ValueError(f"{index_path(self.prefix)}: negative sequence length")
        nbytes = self.sizes.astype(np.int64) * self.dtype.itemsize
        if not np.array_equal(self.pointers, np.cumsum(nbytes) - nbytes):
            raise ValueError(f"{index_path(self.prefix)}: sequence pointers are not the running "
                             "sum of the sequence lengths")
        if np.any(np.diff(self.doc_idx) < 0):
            raise ValueError(f"{index_path(self.prefix)}: document indices decrease")

    def __len__(self) -> int:
        return int(self.sizes.size)

    def _start(self, i: int) -> int:
        return int(self.pointers[i]) // self.dtype.itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {self.prefix} ({n} documents)")
        i %= n
        s = self._start(i)
        return self.tokens[s:s + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``i`` (to its end if length is None)."""
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"range [{offset}, {offset + length}) outside document {i} of "
                             f"{self.prefix} ({size} tokens)")
        s = self._start(i) + offset
        return self.tokens[s:s + length]

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, documents={len(self)}, tokens={self.num_tokens}, "
                f"dtype={self.dtype})")
