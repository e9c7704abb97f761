"""Loading a checkpoint never unpickles arbitrary objects: DCP's ``.metadata`` pickle goes
through an allow-list of the classes that describe a checkpoint, tensors through
``torch.load(weights_only=True)``, and the small non-tensor entries (optimizer
hyper-parameters) are checked with ``weights_only`` before DCP takes them."""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only checkpoint-description classes."""

    _TORCH_NAMES = {"Size", "device"}

    def find_class(self, module: str, name: str):
        # Only the plain data classes that describe a checkpoint, never functions or classes
        # whose construction does work (writers, planners...).
        if module == "torch.distributed.checkpoint.metadata" or (
                module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch":
            obj = getattr(torch, name, None)
            if name in self._TORCH_NAMES or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if (module, name) in (("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        if module == "builtins" and name in ("set", "frozenset", "slice", "tuple", "list", "dict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


def check_metadata(path: str) -> Any:
    """DCP metadata file ``path``, unpickled with the allow-list; ValueError unless it holds
    only checkpoint classes."""
    with open(path, "rb") as f:
        return load_metadata_bytes(f.read(), path)


def load_metadata_bytes(raw: bytes, where: str) -> Any:
    """DCP metadata from its bytes, through the allow-listed unpickler (never plain pickle)."""
    try:
        return _MetadataUnpickler(io.BytesIO(raw)).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{where}: refusing to load: {e}") from None
    except (AttributeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{where} is corrupt: {e}") from None


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        check_metadata(str(self._get_metadata_path(kwargs.get("rank"))))
        return super().read_metadata(*args, **kwargs)


class _SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means "not plain data"
            raise ValueError(f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data: {e}") from None
        value.seek(0)
        super().load_bytes(read_item, value)
