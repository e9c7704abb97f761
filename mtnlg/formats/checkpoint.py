"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), local, gs:// or s3://.

A checkpoint directory ``<dir>/step_00000020/`` holds

* ``.metadata`` + ``__<rank>_0.distcp``: model and optimizer state from
  ``get_state_dict(model, optimizer)``; each rank writes its own shards (DTensor shards
  under tensor parallelism, one copy of replicated tensors), so a checkpoint is written in
  parallel and never gathered on one process;
* ``rng/rank_00003.pt``: every rank's RNG states (dropout differs across ranks);
* ``trainer_state.json``: step, consumed samples (the LR schedule follows from the step),
  layout, tokenizer reference; written last, it marks the checkpoint complete;
* ``config.yaml`` and the tokenizer files, so a checkpoint is usable on its own;
* ``checksums/rank_00003.json``: the size and sha256 of every file a rank wrote, computed by
  that rank right after writing them (rank 0's also lists ``.metadata`` and the side files).

Loading verifies them first (:func:`verify_checkpoint`): a missing, truncated or altered
file, or unreadable metadata, is :class:`CheckpointDamaged` naming the file. Resuming from
``latest`` or ``auto`` (:func:`latest_good`) skips a damaged newest checkpoint for the
newest complete and intact one, with a warning; a checkpoint named explicitly must be intact.

``<dir>/latest`` names the newest complete checkpoint and is written after it. Locally a
checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed; on gs:// and s3:// (no rename) each
rank writes into a local staging directory and uploads, and ``trainer_state.json`` and
then ``latest`` are uploaded only after every rank finished. Either way a reader following
``latest`` never sees a partial checkpoint.

Loading never unpickles arbitrary objects: tensors go through ``torch.load(weights_only=
True)``, DCP's metadata pickle is read with an allow-list of checkpoint classes, and the
small non-tensor entries (optimizer hyper-parameters) are checked with ``weights_only``.

All functions here that take a model are collective: every rank calls them.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.storage import StorageReader

from mtnlg import storage
from mtnlg.dist import barrier, broadcast_object, first_error
from mtnlg.formats.rundir import CHECKPOINTS_DIR, LATEST, RUN_CONFIG, TRAINER_STATE
from mtnlg.progress import get_logger

log = get_logger("mtnlg.formats.checkpoint")

FORMAT = "mtnlg-dcp-1"
_STEP_RE = re.compile(r"^step_(\d{8})$")
CHECKSUMS_DIR = "checksums"


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match its checksums (or are missing, or unreadable)."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a file-size limit, an I/O error)."""


# --------------------------------------------------------------------------- checksums


def file_digest(path: str) -> dict[str, Any]:
    """Size and sha256 of a file, local, gs:// or s3:// (``sha256_file``, the one hasher of
    checkpoints and fused models)."""
    from mtnlg.formats.sharded_safetensors import sha256_file

    digest, size = sha256_file(path, with_size=True)
    return {"sha256": digest, "size": size}


def write_checksums(root: str, names: list[str], rank: int, suffix: str = "") -> None:
    """``root/checksums/rank_XXXXX{suffix}.json`` for the files ``names`` (relative to a local ``root``)."""
    os.makedirs(os.path.join(root, CHECKSUMS_DIR), exist_ok=True)
    sums = {n: file_digest(os.path.join(root, n)) for n in sorted(names)}
    with open(os.path.join(root, CHECKSUMS_DIR, f"rank_{rank:05d}{suffix}.json"), "w", encoding="utf-8") as f:
        json.dump(sums, f, indent=1, sort_keys=True)


def _rank_files(root: str, rank: int) -> list[str]:
    """The files rank ``rank`` wrote into the local checkpoint directory ``root``."""
    names = [n for n in os.listdir(root) if n.startswith(f"__{rank}_") and n.endswith(".distcp")]
    names.append(f"rng/rank_{rank:05d}.pt")
    if rank == 0 and os.path.exists(os.path.join(root, ".metadata")):
        names.append(".metadata")
    return names


def _safe_name(name: str, where: str) -> str:
    """``name`` if it stays inside the checkpoint directory (``manifest.safe_relative``, the
    one path check of checkpoints and fused models); ``CheckpointDamaged`` otherwise."""
    from mtnlg.formats.manifest import safe_relative

    try:
        return safe_relative(name, where)
    except ValueError as e:
        raise CheckpointDamaged(str(e).replace("the model directory", "the checkpoint directory")) from None


def verify_checkpoint(path: str, shards: str = "hash") -> list[str]:
    """What is wrong with the checkpoint directory ``path`` (local, gs:// or s3://; empty:
    nothing): each problem names its file. Sizes come from one listing. ``shards="hash"``
    hashes every file; ``"size"`` checks the per-rank files (DCP shards ``__R_*.distcp``
    and ``rng/rank_*.pt``) by size only and hashes the rest (small, shared), for a remote
    checkpoint about to be loaded with ranged reads, where each rank hashes its own RNG
    file and the shard files it reads whole (``_RangedShardReader``). A checkpoint from
    before checksums were written is checked for completeness only."""
    return _verify(path, shards)[0]


def _verify(path: str, shards: str) -> tuple[list[str], dict[str, dict]]:
    """``verify_checkpoint``'s problems, and the checksum entries it read (by file name)."""
    if shards not in ("hash", "size"):
        raise ValueError(f"shards must be 'hash' or 'size', got {shards!r}")
    problems: list[str] = []
    listed: dict[str, dict] = {}
    try:
        sizes = storage.file_sizes(path)
    except FileNotFoundError:
        sizes = {}
    if TRAINER_STATE not in sizes:
        return [f"{TRAINER_STATE}: missing (the checkpoint is incomplete)"], listed
    try:
        meta = json.loads(storage.read_text(storage.join(path, TRAINER_STATE)))
    except (OSError, ValueError) as e:
        return [f"{TRAINER_STATE}: unreadable ({e})"], listed
    if meta.get("format") != FORMAT:
        return [f"{TRAINER_STATE}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})"], listed
    world = int(meta.get("world_size") or 0)
    if any(n.startswith(CHECKSUMS_DIR + "/") for n in sizes):
        listed = _listed_checksums(path, sizes, world, problems)
        for name, want in sorted(listed.items()):
            try:
                _safe_name(name, CHECKSUMS_DIR)
            except CheckpointDamaged as e:
                problems.append(str(e))
                continue
            if name not in sizes:
                problems.append(f"{name}: missing")
                continue
            if sizes[name] != want.get("size"):
                problems.append(f"{name}: {sizes[name]} bytes, expected {want.get('size')} (truncated or overwritten)")
                continue
            if shards == "size" and _per_rank_file(name):
                continue
            if file_digest(storage.join(path, name))["sha256"] != want.get("sha256"):
                problems.append(f"{name}: sha256 mismatch (the file's content changed after it was written)")
    else:
        log.warning("%s has no %s/ (written before checkpoints carried checksums): checking completeness only",
                    path, CHECKSUMS_DIR)
        for r in range(world):
            if not any(n.startswith(f"__{r}_") for n in sizes):
                problems.append(f"__{r}_0.distcp: missing (rank {r}'s shards)")
    if not problems:
        where = storage.join(path, ".metadata")
        try:
            load_metadata_bytes(storage.read_bytes(where), where)
        except Exception as e:  # noqa: BLE001 - reported as the checkpoint's problem
            problems.append(f".metadata: unreadable ({e})")
    return problems, listed


_PER_RANK = re.compile(r"^(__\d+_\d+\.distcp|rng/rank_\d{5}\.pt)$")


def _per_rank_file(name: str) -> bool:
    return bool(_PER_RANK.match(name))


def _listed_checksums(path: str, sizes: dict[str, int], world: int, problems: list[str]) -> dict[str, dict]:
    """Every rank's checksum entries (and rank 0's side files'), by file name; a missing or
    unreadable list is added to ``problems``."""
    listed: dict[str, dict] = {}
    names = [f"{CHECKSUMS_DIR}/rank_{r:05d}.json" for r in range(world)]
    for r, name in enumerate(names):
        if name not in sizes:
            problems.append(f"{name}: missing (rank {r}'s files are unverified)")
            continue
        try:
            listed.update(json.loads(storage.read_text(storage.join(path, name))))
        except (OSError, ValueError) as e:
            problems.append(f"{name}: unreadable ({e})")
    side = f"{CHECKSUMS_DIR}/rank_00000-side.json"
    if side in sizes:
        try:
            listed.update(json.loads(storage.read_text(storage.join(path, side))))
        except (OSError, ValueError) as e:
            problems.append(f"{side}: unreadable ({e})")
    return listed


def verify_or_raise(path: str, local: str | None = None, shards: str = "hash") -> None:
    problems = verify_checkpoint(local or path, shards=shards)
    if problems:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: " + "; ".join(problems))


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (``weights_only``-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- safe loading


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


class _Writer(FileSystemWriter):
    """DCP's file writer, recording in ``.metadata`` the checkpoint's final location and
    name instead of the staging directory and a random id, so that the same state saved
    to the same place gives the same bytes."""

    def __init__(self, path: str, final: str):
        super().__init__(path)
        self._final = final

    def storage_meta(self):
        from torch.distributed.checkpoint.metadata import StorageMeta

        return StorageMeta(checkpoint_id=self._final, save_id=self._final.rstrip("/").rsplit("/", 1)[-1])


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


class _RangedShardReader(StorageReader):
    """DCP storage reader for a checkpoint on gs:// or s3://, read in place: this rank
    fetches only the byte ranges of the entries its load plan names, merged per file
    (entries closer than ``GAP`` in one request of at most ``MAX_SPAN`` bytes, unless one
    entry is larger), so no whole checkpoint is copied to any node. A shard file the plan
    covers whole (at an unchanged layout, every rank's own file) is hashed as it streams
    past and checked against its checksum; the others were checked by size beforehand
    (``verify_checkpoint(shards="size")``). Entries go through the same safe loading as
    local ones (``weights_only``, the allow-listed metadata unpickler)."""

    GAP = 1 << 20
    MAX_SPAN = 256 << 20

    def __init__(self, path: str, checksums: dict[str, dict]):
        super().__init__()
        self.path = path
        self.checksums = checksums
        self.storage_data: dict[Any, Any] = {}
        self.bytes_read = 0
        self.requests = 0
        self.hashed: list[str] = []

    def reset(self, checkpoint_id: Any = None) -> None:
        self.storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        where = storage.join(self.path, ".metadata")
        metadata = load_metadata_bytes(storage.read_bytes(where), where)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.path
        return metadata

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return storage.is_remote(str(checkpoint_id))

    def _spans(self, entries: list) -> list[tuple[int, int, list]]:
        """(start, end, entries) requests covering ``entries`` sorted by offset."""
        spans: list[tuple[int, int, list]] = []
        for off, length, item in sorted(entries, key=lambda e: e[0]):
            if spans:
                start, end, members = spans[-1]
                if off - end <= self.GAP and max(end, off + length) - start <= self.MAX_SPAN:
                    spans[-1] = (start, max(end, off + length), members + [(off, length, item)])
                    continue
            spans.append((off, off + length, [(off, length, item)]))
        return spans

    def read_data(self, plan, planner):
        from torch.futures import Future

        per_file: dict[str, list] = defaultdict(list)
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if getattr(info, "transform_descriptors", None):
                raise CheckpointDamaged(f"{self.path}/{info.relative_path}: entry {item.storage_index.fqn!r} "
                                        f"has stream transforms {info.transform_descriptors}, which mtnlg never writes")
            per_file[info.relative_path].append((info.offset, info.length, item))
        for rel, entries in per_file.items():
            uri = storage.join(self.path, _safe_name(rel, ".metadata"))
            spans = self._spans(entries)
            want = self.checksums.get(rel, {})
            whole = (want.get("size") is not None and spans[0][0] == 0 and spans[-1][1] == want["size"]
                     and all(a[1] >= b[0] for a, b in zip(spans, spans[1:])))
            digest, pos = hashlib.sha256(), 0
            with storage.open_ranged(uri) as f:
                for start, end, members in spans:
                    f.seek(start)
                    data = f.read(end - start)
                    self.requests += 1
                    self.bytes_read += len(data)
                    if len(data) != end - start:
                        raise CheckpointDamaged(f"{uri}: bytes {start}-{end} asked for, {len(data)} read "
                                                "(the file is shorter than its metadata says)")
                    if whole:
                        digest.update(memoryview(data)[pos - start:])
                        pos = max(pos, end)
                    for off, length, item in members:
                        self._deliver(item, data[off - start:off - start + length], planner, uri)
            if whole:
                if digest.hexdigest() != want.get("sha256"):
                    raise CheckpointDamaged(f"checkpoint {self.path} is damaged: {rel}: sha256 mismatch "
                                            "(the file's content changed after it was written)")
                self.hashed.append(rel)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    @staticmethod
    def _deliver(item, raw: bytes, planner, uri: str) -> None:
        from torch.distributed._shard._utils import narrow_tensor_by_index
        from torch.distributed.checkpoint.planner import LoadItemType

        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(raw))
            return
        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CheckpointDamaged(f"{uri}: entry {item.storage_index.fqn!r} has shape {tuple(tensor.size())}, "
                                    f"the model expects {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(item, target)


# --------------------------------------------------------------------------- listing


def read_latest(directory: str) -> str | None:
    """The checkpoint named by ``directory/latest``, or None if there is none."""
    pointer = storage.join(directory, LATEST)
    if not storage.exists(pointer):
        return None
    name = storage.read_text(pointer).strip()
    if not _STEP_RE.match(name):
        raise ValueError(f"{pointer}: expected a name like step_00000020, got {name!r}")
    return storage.join(directory, name)


def list_checkpoints(directory: str) -> list[tuple[int, str, bool]]:
    """``(step, path, complete)`` for every ``step_*`` entry (and ``.tmp`` leftovers), by step."""
    names: dict[str, bool] = {}
    if storage.is_remote(directory):
        base = directory.rstrip("/") + "/"
        for f in storage.list_files(directory):
            rel = f[len(base):]
            if "/" not in rel:
                continue
            top, rest = rel.split("/", 1)
            names[top] = names.get(top, False) or rest == TRAINER_STATE
    elif os.path.isdir(directory):
        for top in os.listdir(directory):
            full = os.path.join(directory, top)
            if os.path.isdir(full):
                names[top] = os.path.exists(os.path.join(full, TRAINER_STATE)) and not top.endswith(".tmp")
    out = []
    for top, complete in names.items():
        m = re.match(r"^step_(\d{8})(\.tmp)?$", top)
        if m:
            out.append((int(m.group(1)), storage.join(directory, top), complete and not m.group(2)))
    return sorted(out, key=lambda t: (t[0], t[1]))


def latest_good(directory: str, skip: tuple[str, ...] | list[str] = ()) -> str | None:
    """The checkpoint to resume from in ``directory``: the one ``latest`` names when it is
    intact, else the newest complete and intact one (a warning names what was skipped and
    why); None when there is no checkpoint at all (or all are in ``skip``). Raises
    CheckpointDamaged when there are checkpoints but none is intact. Collective when a
    process group exists: rank 0 checks (local checkpoints hashed whole, remote ones by
    size for the per-rank files, ``verify_checkpoint``) and every rank gets its answer."""
    answer = _pick_latest_good(directory, tuple(skip)) if _rank() == 0 else None
    path, error = broadcast_object(answer)
    if error:
        raise CheckpointDamaged(error)
    return path


def _pick_latest_good(directory: str, skip: tuple[str, ...]) -> tuple[str | None, str | None]:
    named = read_latest(directory)
    candidates = [p for _, p, ok in reversed(list_checkpoints(directory)) if ok and p not in skip]
    if named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    elif named is not None and named not in skip:
        log.warning("%s/latest names %s, which is not a complete checkpoint: looking for an older one",
                    directory, named)
    skipped = []
    for cand in candidates:
        problems = verify_checkpoint(cand, shards="size" if storage.is_remote(cand) else "hash")
        if not problems:
            if skipped:
                log.warning("resuming from %s: skipped damaged %s", cand, "; ".join(skipped))
            return cand, None
        skipped.append(f"{cand} ({'; '.join(problems)})")
    if skipped:
        return None, f"no intact checkpoint in {directory}: " + "; ".join(skipped)
    return None, None


def written_whole(path: str) -> list[str]:
    """What is missing or cut short in a checkpoint just written to ``path`` (local, gs:// or
    s3://; empty: nothing), found from one listing and the small checksum files, without
    reading the shards: the completion marker, one checksum file per rank, and every file
    they list, at the size they list."""
    sizes = storage.file_sizes(path)
    if TRAINER_STATE not in sizes:
        return [f"{TRAINER_STATE}: missing"]
    try:
        world = int(json.loads(storage.read_text(storage.join(path, TRAINER_STATE))).get("world_size") or 0)
    except (OSError, ValueError) as e:
        return [f"{TRAINER_STATE}: unreadable ({e})"]
    problems = []
    sums = [f"{CHECKSUMS_DIR}/rank_{r:05d}.json" for r in range(world)]
    if f"{CHECKSUMS_DIR}/rank_00000-side.json" in sizes:
        sums.append(f"{CHECKSUMS_DIR}/rank_00000-side.json")
    for name in sums:
        if name not in sizes:
            problems.append(f"{name}: missing")
            continue
        try:
            listed = json.loads(storage.read_text(storage.join(path, name)))
        except (OSError, ValueError) as e:
            problems.append(f"{name}: unreadable ({e})")
            continue
        for f, want in sorted(listed.items()):
            if f not in sizes:
                problems.append(f"{f}: missing")
            elif sizes[f] != want.get("size"):
                problems.append(f"{f}: {sizes[f]} bytes, expected {want.get('size')}")
    return problems


def prune_checkpoints(directory: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all) and any
    incomplete leftovers; the one ``latest`` names is always kept. Returns what was removed."""
    entries = list_checkpoints(directory)
    latest = read_latest(directory)
    complete = [p for _, p, ok in entries if ok]
    keep = set(complete if keep_last == 0 else complete[-keep_last:])
    if latest:
        keep.add(latest)
    removed = []
    for _, path, _ok in entries:
        if path not in keep:
            storage.remove(path)
            removed.append(path)
    return removed


def resolve_checkpoint(spec: str) -> str:
    """A checkpoint directory from ``spec``: the checkpoint itself, a directory with a
    ``latest`` pointer, or a run directory holding ``checkpoints/latest``."""
    if storage.exists(storage.join(spec, TRAINER_STATE)):
        return spec.rstrip("/")
    for d in (spec, storage.join(spec, CHECKPOINTS_DIR)):
        found = read_latest(d)
        if found:
            if not storage.exists(storage.join(found, TRAINER_STATE)):
                raise FileNotFoundError(f"{d}/latest names {found}, which has no {TRAINER_STATE}")
            return found
    raise FileNotFoundError(f"no checkpoint at {spec!r} (expected {TRAINER_STATE}, latest, or checkpoints/latest)")


# --------------------------------------------------------------------------- save / load


def _write_side_files(target: str, trainer_state: dict, config_text: str | None,
                      extra_files: dict[str, str] | None) -> None:
    with tempfile.TemporaryDirectory(prefix="mtnlg-side-") as d:
        names = []
        if config_text is not None:
            with open(os.path.join(d, RUN_CONFIG), "w", encoding="utf-8") as f:
                f.write(config_text)
            names.append(RUN_CONFIG)
        for name, src in (extra_files or {}).items():
            storage.copy(src, os.path.join(d, name))
            names.append(name)
        write_checksums(d, names, 0, suffix="-side")
        for name in names + [f"{CHECKSUMS_DIR}/rank_00000-side.json"]:
            storage.copy(os.path.join(d, name), storage.join(target, name))
    # Last: its presence marks the checkpoint complete.
    storage.write_text(storage.join(target, TRAINER_STATE), json.dumps(trainer_state, indent=2, sort_keys=True))


def save_checkpoint(directory: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], config_text: str | None = None,
                    extra_files: dict[str, str] | None = None, keep_last: int = 0,
                    flatten_optimizer: bool = False) -> str:
    """Write ``directory/step_XXXXXXXX`` atomically, point ``latest`` at it, prune; collective.

    ``trainer_state`` is JSON data (step, consumed samples, ...); ``extra_files`` maps a
    file name inside the checkpoint to a source path (the tokenizer files). Returns the
    checkpoint's path. ``flatten_optimizer`` keys the optimizer's param-group settings by
    parameter name too (``param_groups.<fqn>.lr``); pipeline parallelism needs it, since
    each stage's optimizer holds different parameters, and must load with the same flag.
    """
    pending = PendingCheckpoint(directory, step, model, optimizer, trainer_state, config_text, extra_files,
                                keep_last, flatten_optimizer, process_group=None)
    return pending.finish()


class PendingCheckpoint:
    """A checkpoint being written: :class:`save_checkpoint` in two halves.

    Made with ``process_group`` (a gloo group of its own), the model and optimizer state is
    copied to host memory at once (DCP's ``async_save`` staging) and written to disk by a
    background thread while training goes on; :meth:`finish` waits for the writes and does
    the rest (per-rank checksums, upload of remote checkpoints, side files, the atomic
    rename, ``latest``, pruning). Without a group it writes synchronously. The RNG states are
    taken when it is made, so the checkpoint is of that moment whatever runs after.
    Collective: every rank makes it and calls :meth:`finish`."""

    def __init__(self, directory: str, step: int, model, optimizer, trainer_state: dict[str, Any],
                 config_text: str | None, extra_files: dict[str, str] | None, keep_last: int,
                 flatten_optimizer: bool, process_group=None):
        self.rank, world = _rank(), _world()
        self.directory, self.keep_last = directory, keep_last
        self.name = step_dirname(step)
        self.final = storage.join(directory, self.name)
        self.config_text, self.extra_files = config_text, extra_files
        options = StateDictOptions(flatten_optimizer_state_dict=flatten_optimizer)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
        self.meta = dict(trainer_state, step=step, world_size=world, format=FORMAT)
        self.rng = rng_state()
        self.remote = storage.is_remote(directory)
        if not self.remote:
            self.where = self.final + ".tmp"
            if self.rank == 0:
                shutil.rmtree(self.where, ignore_errors=True)
                os.makedirs(os.path.join(self.where, "rng"))
        else:
            if self.rank == 0 and storage.isdir(self.final):
                storage.remove(self.final)  # a partial upload from an earlier, interrupted attempt
            self.where = tempfile.mkdtemp(prefix=f"mtnlg-ckpt-r{self.rank}-")
            os.makedirs(os.path.join(self.where, "rng"))
        barrier()
        self.future = None
        try:
            if process_group is None:
                dcp.save(state, storage_writer=_Writer(self.where, self.final))
            else:
                self.future = dcp.async_save(state, storage_writer=_Writer(self.where, self.final),
                                             process_group=process_group)
        except (Exception, CheckpointException) as e:
            self._failed(e)

    def _failed(self, e: BaseException):
        cause = next(iter(getattr(e, "failures", {}).values()), e)  # DCP wraps each rank's error
        cause = cause[0] if isinstance(cause, tuple) else cause
        if self.remote:
            shutil.rmtree(self.where, ignore_errors=True)
        raise CheckpointSaveError(f"saving checkpoint {self.final} failed on rank {self.rank}: "
                                  f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''} "
                                  f"({storage.write_failure_hint(self.where, e)}); the previous checkpoint "
                                  "is untouched and `latest` still names it") from e

    @property
    def written(self) -> bool:
        """The background write is over (always true for a synchronous save)."""
        return self.future is None or self.future.done()

    def finish(self) -> str:
        """Wait for the shards, then make the checkpoint complete and current; its path."""
        rank, rng_name = self.rank, f"rank_{self.rank:05d}.pt"
        try:
            if self.future is not None:
                self.future.result()
            torch.save(self.rng, os.path.join(self.where, "rng", rng_name))
        except (Exception, CheckpointException) as e:  # a full disk: ENOSPC/EFBIG, or a short write in torch
            self._failed(e)
        if not self.remote:
            barrier()  # .metadata is written once every rank's shards are
            write_checksums(self.where, _rank_files(self.where, rank), rank)
            barrier()
            if rank == 0:
                _write_side_files(self.where, self.meta, self.config_text, self.extra_files)
                if os.path.exists(self.final):
                    shutil.rmtree(self.final)
                os.replace(self.where, self.final)
        else:
            try:
                write_checksums(self.where, _rank_files(self.where, rank), rank)
                storage.copy_tree(self.where, self.final)  # this rank's shards and checksums (rank 0 also .metadata)
            finally:
                shutil.rmtree(self.where, ignore_errors=True)
            barrier()
            if rank == 0:
                _write_side_files(self.final, self.meta, self.config_text, self.extra_files)
        if rank == 0:
            # Before `latest` moves and older checkpoints go, the new one must read back whole
            # (each file there at the size its writer recorded): pruning never deletes the
            # newest good checkpoint for one that is not.
            problems = written_whole(self.final)
            if problems:
                log.error("checkpoint %s did not read back whole (%s): `latest` still names the previous "
                          "checkpoint and nothing was pruned", self.final, "; ".join(problems))
            else:
                storage.write_text(storage.join(self.directory, LATEST), self.name + "\n")
                removed = prune_checkpoints(self.directory, self.keep_last)
                log.info("saved checkpoint %s%s", self.final, f" (pruned {len(removed)})" if removed else "")
        barrier()
        return self.final


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    flatten_optimizer: bool = False) -> dict[str, Any]:
    """Load model (and optimizer) state and this rank's RNG states from checkpoint ``path``
    in place; returns the trainer state saved with it. Collective. ``flatten_optimizer``
    as in ``save_checkpoint``.

    A local checkpoint is verified whole (sizes and sha256 of every file) and read in
    place. One on gs:// or s3:// is read in place too, with ranged requests: each rank
    checks the listing's sizes and the small files' hashes, then fetches only the byte
    ranges of its own entries (``_RangedShardReader``), hashing each shard file it reads
    whole; nothing is copied to local disk."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten_optimizer)
    rank, world = _rank(), _world()
    remote = storage.is_remote(path)
    state_path = storage.join(path, TRAINER_STATE)
    if not storage.exists(state_path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    meta = json.loads(storage.read_text(state_path))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    # checksums and metadata: a clear error before DCP reads anything
    if remote:
        # rank 0 lists and checks once for everyone (sizes, shared files' hashes); each
        # rank then hashes its own RNG file and the shard files it reads whole
        problems, sums = broadcast_object(_verify(path, "size") if rank == 0 else None)
        if problems:
            raise CheckpointDamaged(f"checkpoint {path} is damaged: " + "; ".join(problems))
        reader: StorageReader = _RangedShardReader(path, sums)
    else:
        verify_or_raise(path)
        reader = _SafeReader(path)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    try:
        dcp.load(state, storage_reader=reader, planner=_SafeLoadPlanner())
    except CheckpointException as e:  # a rank's reader failed: every rank raises it
        damaged = [str(exc) for exc, _trace in e.failures.values() if isinstance(exc, CheckpointDamaged)]
        if damaged:
            raise CheckpointDamaged("; ".join(sorted(set(damaged)))) from None
        raise
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
    else:
        set_model_state_dict(model, state["model"])
    if remote:
        log.info("%s: read %.1f MB of shards in %d ranged requests; hashed whole: %s", path,
                 reader.bytes_read / 1e6, reader.requests, ", ".join(reader.hashed) or "none")
    rng_name = f"rng/rank_{rank:05d}.pt"
    rng_path = storage.join(path, rng_name)
    restore = meta.get("world_size") == world and storage.exists(rng_path)
    raw = storage.read_bytes(rng_path) if restore else b""
    want = reader.checksums.get(rng_name) if remote and restore else None
    bad = (f"{rng_name}: sha256 mismatch (the file's content changed after it was written)"
           if want and hashlib.sha256(raw).hexdigest() != want.get("sha256") else None)
    bad = first_error(bad)  # collective: a damaged file on one rank stops every rank
    if bad:
        raise CheckpointDamaged(f"checkpoint {path} is damaged: {bad}")
    if restore:
        set_rng_state(torch.load(io.BytesIO(raw), weights_only=True))
    elif meta.get("rng"):
        log.info("%s: RNG states %s; the ranks are seeded afresh", path, meta["rng"])
    else:
        log.warning("%s: saved with %s processes, now %d: RNG states not restored",
                    path, meta.get("world_size"), world)
    return meta
