"""Streaming safetensors writer: size-bounded shards, an index, and sha256 checksums.

The safetensors format is an 8-byte little-endian header length, a JSON header naming
every tensor's dtype, shape and byte range, then the raw bytes. Because the header only
needs shapes and dtypes, which a checkpoint's metadata gives before any tensor is read,
the writer lays out every shard up front and then takes tensors one at a time, writing
each straight to disk and hashing it on the way: memory holds one tensor, never the
model.

    specs = [TensorSpec("norm.weight", (64,), torch.float32), ...]
    with ShardedSafetensorsWriter(out_dir, specs, max_shard_bytes=2 << 30) as w:
        for spec in specs:
            w.write(spec.name, load_tensor(spec.name))
    w.files   # {"model.safetensors": {"sha256": ..., "bytes": ..., "tensors": [...]}}

One shard is written as ``model.safetensors``; more as ``model-00001-of-00003.safetensors``
with ``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``), the
layout Hugging Face ``from_pretrained`` reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch

from mtnlg.formats.rundir import SINGLE_WEIGHTS, WEIGHTS_INDEX

# torch dtype <-> safetensors dtype name
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

# dtypes a fused model may be written in (``--dtype``)
FUSE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know about a tensor before it is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` (kept in order) into groups of at most ``max_shard_bytes`` each; a
    tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards


def shard_filenames(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (any dtype, bf16 included)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardedSafetensorsWriter:
    """Writes the tensors of ``specs``, in that order, into size-bounded safetensors files.

    ``write`` must be called once per spec, in order, with a tensor of exactly that shape
    (it is cast to the spec's dtype); a mismatch is an error naming the tensor. ``close``
    (or leaving the ``with`` block) checks that nothing is missing, writes the index when
    there is more than one shard, and fills ``files`` with each file's sha256 and size.
    """

    def __init__(self, directory: str, specs: list[TensorSpec], max_shard_bytes: int = 2 << 30,
                 metadata: dict[str, str] | None = None):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate tensor names: {dup}")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(list(specs), max_shard_bytes)
        self.filenames = shard_filenames(len(self.shards))
        self._order = [(fi, s) for fi, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._fh = None
        self._hash = None
        self._file_index = -1
        self.files: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, dict[str, Any]] = {}

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._fh is not None:
            self._fh.close()
            self._fh = None

    # -- writing -----------------------------------------------------------------------
    def _open(self, fi: int) -> None:
        self._finish_file()
        self._file_index = fi
        path = os.path.join(self.directory, self.filenames[fi])
        self._fh = open(path, "wb")
        self._hash = hashlib.sha256()
        self._emit(_header(self.shards[fi], self.metadata))

    def _emit(self, data) -> None:
        self._fh.write(data)
        self._hash.update(data)

    def _finish_file(self) -> None:
        if self._fh is None:
            return
        name = self.filenames[self._file_index]
        self._fh.close()
        self._fh = None
        self.files[name] = {"sha256": self._hash.hexdigest(),
                            "bytes": os.path.getsize(os.path.join(self.directory, name)),
                            "tensors": [s.name for s in self.shards[self._file_index]]}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r}: all {len(self._order)} planned tensors were already written")
        fi, spec = self._order[self._next]
        if name != spec.name:
            raise ValueError(f"tensor {name!r} written out of order: expected {spec.name!r} next")
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        if fi != self._file_index:
            self._open(fi)
        data = tensor_bytes(tensor.to(spec.dtype))
        self._emit(data)
        # per-tensor checksums let a damaged file be traced to the tensor it hit
        self.tensors[name] = {"shape": list(spec.shape), "dtype": DTYPE_NAMES[spec.dtype],
                              "file": self.filenames[fi], "sha256": hashlib.sha256(data).hexdigest()}
        self._next += 1

    def close(self) -> dict[str, dict[str, Any]]:
        if self._next != len(self._order):
            missing = [s.name for _, s in self._order[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[0]!r}")
        if not self._order:  # an empty model still gets a valid (empty) file
            self._open(0)
        self._finish_file()
        if len(self.filenames) > 1:
            total = sum(s.nbytes for shard in self.shards for s in shard)
            index = {"metadata": {"total_size": total},
                     "weight_map": {s.name: self.filenames[fi] for fi, s in self._order}}
            path = os.path.join(self.directory, WEIGHTS_INDEX)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
            self.files[WEIGHTS_INDEX] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
        return self.files


def read_header(path: str) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its data starts."""
    from mtnlg import storage

    with storage.open_read(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is truncated: {len(raw)} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError(f"{path}: safetensors header length {n} is implausible; the file is corrupt")
        head = f.read(n)
    try:
        return json.loads(head.decode("utf-8")), 8 + n
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the safetensors header is corrupt ({e})") from None


def sha256_file(path: str, chunk: int = 8 << 20, with_size: bool = False):
    """Hex sha256 of a local file or gs:// or s3:// object, read in chunks; with
    ``with_size``, ``(sha256, bytes read)``."""
    from mtnlg import storage

    h, n = hashlib.sha256(), 0
    with storage.open_read(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            n += len(b)
    return (h.hexdigest(), n) if with_size else h.hexdigest()


def save_state_dict(state: dict[str, torch.Tensor], directory: str, max_shard_bytes: int = 2 << 30,
                    metadata: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Write an in-memory state dict (e.g. a Hugging Face export) through the same writer."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    with ShardedSafetensorsWriter(directory, specs, max_shard_bytes, metadata) as w:
        for k, v in state.items():
            w.write(k, v)
    return w.files
