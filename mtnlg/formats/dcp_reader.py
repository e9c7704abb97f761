"""Read full tensors out of a DCP training checkpoint, one at a time, without a process group.

A DCP checkpoint (``mtnlg.formats.checkpoint``) is ``.metadata`` plus one ``__<rank>_0.distcp``
file per rank that wrote shards. The metadata lists, for every tensor, its full size and
its chunks (offsets and sizes inside the full tensor); for every chunk, the file and byte
range where it is stored (a ``torch.save`` of that chunk). Which (tp, dp, pp) layout wrote
the checkpoint only changes how the tensors are chunked, so one reader serves them all:
allocate the full tensor, read each chunk's bytes, place it.

    r = CheckpointReader("runs/train/checkpoints/step_00000020")   # local, gs:// or s3://
    r.model_tensors()            # {"tok_embeddings.weight": TensorSpec(fqn, shape, dtype), ...}
    w = r.read("model.tok_embeddings.weight")     # full tensor, nothing else loaded

Only the bytes of the requested tensor are read (ranged reads on gs:// and s3://), so fusing never
touches the optimizer state. Errors name the file and the tensor: a missing shard file,
a truncated one, a chunk that does not unpickle as a tensor or has the wrong shape, or
chunks that do not cover the tensor.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from mtnlg import storage
from mtnlg.formats.rundir import TRAINER_STATE
from mtnlg.formats.sharded_safetensors import TensorSpec

METADATA_FILE = ".metadata"
MODEL_PREFIX = "model."


def _load_metadata(path: str):
    """DCP's ``.metadata``, through the checkpoint module's allow-listed unpickler."""
    from mtnlg.formats.checkpoint import load_metadata_bytes

    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a DCP checkpoint (or an incomplete one)") from None
    return load_metadata_bytes(raw, path)


class CheckpointReader:
    """Random access to the full tensors of one DCP checkpoint directory."""

    def __init__(self, path: str):
        self.path = path.rstrip("/")
        self.metadata = _load_metadata(storage.join(self.path, METADATA_FILE))
        self._sizes: dict[str, int] = {}
        self._handles: dict[str, Any] = {}
        state = storage.join(self.path, TRAINER_STATE)
        self.trainer_state: dict[str, Any] = json.loads(storage.read_text(state)) if storage.exists(state) else {}

    # -- listing -----------------------------------------------------------------------
    def entries(self) -> dict[str, Any]:
        """Every entry of the checkpoint: fqn -> TensorStorageMetadata | BytesStorageMetadata."""
        return dict(self.metadata.state_dict_metadata)

    def tensor_info(self, fqn: str) -> TensorSpec:
        md = self.metadata.state_dict_metadata.get(fqn)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{self.path}: no tensor {fqn!r} in the checkpoint")
        return TensorSpec(fqn, tuple(md.size), md.properties.dtype)

    def model_tensors(self) -> dict[str, TensorSpec]:
        """The model's tensors (names without the ``model.`` prefix), in checkpoint order."""
        out = {}
        for fqn, md in self.metadata.state_dict_metadata.items():
            if fqn.startswith(MODEL_PREFIX) and isinstance(md, TensorStorageMetadata):
                out[fqn[len(MODEL_PREFIX):]] = TensorSpec(fqn, tuple(md.size), md.properties.dtype)
        if not out:
            raise ValueError(f"{self.path}: the checkpoint holds no model tensors (no 'model.*' entries)")
        return out

    def files(self) -> list[str]:
        """The shard files the metadata refers to."""
        return sorted({s.relative_path for s in self.metadata.storage_data.values()})

    # -- reading -----------------------------------------------------------------------
    def _file_size(self, rel: str) -> int:
        if rel not in self._sizes:
            path = storage.join(self.path, rel)
            if not storage.exists(path):
                self._sizes[rel] = -1
            else:
                self._sizes[rel] = storage.size(path)
        return self._sizes[rel]

    def _storage(self, fqn: str, offsets) -> Any:
        info = self.metadata.storage_data.get(MetadataIndex(fqn, offsets))
        if info is None:
            raise ValueError(f"{self.path}/{METADATA_FILE}: no storage record for tensor {fqn!r} "
                             f"chunk at {list(offsets) if offsets is not None else 'whole'}")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{self.path}: tensor {fqn!r} is stored with transforms "
                             f"{info.transform_descriptors}, which this reader does not support")
        path = storage.join(self.path, info.relative_path)
        size = self._file_size(info.relative_path)
        if size < 0:
            raise FileNotFoundError(f"{path} is missing: shard file holding tensor {fqn!r} "
                                    f"(chunk at {list(offsets) if offsets is not None else 'whole'})")
        if info.offset + info.length > size:
            raise ValueError(f"{path} is truncated ({size} bytes): tensor {fqn!r} needs bytes "
                             f"[{info.offset}, {info.offset + info.length})")
        return info, path

    def _read_range(self, path: str, offset: int, length: int) -> bytes:
        f = self._handles.get(path)
        if f is None:  # kept open: on gs:// and s3:// each open is a request
            f = self._handles[path] = storage.open_read(path, "rb")
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise ValueError(f"{path} is truncated: wanted {length} bytes at {offset}, got {len(data)}")
        return data

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, fqn: str) -> torch.Tensor:
        """The full tensor ``fqn`` (e.g. ``model.layers.0.attention.wq.weight``)."""
        md = self.metadata.state_dict_metadata.get(fqn)
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{self.path}: no tensor {fqn!r} in the checkpoint")
        full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            info, path = self._storage(fqn, chunk.offsets)
            raw = self._read_range(path, info.offset, info.length)
            try:
                part = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure means damaged bytes
                raise ValueError(f"{path}: cannot read tensor {fqn!r} chunk at byte {info.offset}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            if not isinstance(part, torch.Tensor) or tuple(part.shape) != tuple(chunk.sizes):
                got = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                raise ValueError(f"{path}: tensor {fqn!r} chunk at {list(chunk.offsets)} has shape {got}, "
                                 f"the metadata says {tuple(chunk.sizes)}")
            region = full
            for d, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes)):
                region = region.narrow(d, o, n)
            region.copy_(part)
            covered += part.numel()
        if covered != full.numel():
            raise ValueError(f"{self.path}: the chunks of tensor {fqn!r} cover {covered} of its "
                             f"{full.numel()} elements (shape {tuple(md.size)})")
        return full

    def read_bytes_entry(self, fqn: str) -> Any:
        """A non-tensor entry (optimizer hyper-parameters), loaded as plain data."""
        md = self.metadata.state_dict_metadata.get(fqn)
        if not isinstance(md, BytesStorageMetadata):
            raise KeyError(f"{self.path}: no plain-data entry {fqn!r} in the checkpoint")
        info, path = self._storage(fqn, None)
        raw = self._read_range(path, info.offset, info.length)
        try:
            return torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: entry {fqn!r} is not plain data: {e}") from None
