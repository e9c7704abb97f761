"""Saving and loading a checkpoint: model and optimizer state through DCP (each rank its
own shards), every rank's RNG states, the side files, then the completion marker and
``latest``; a save may run in the background (:class:`PendingCheckpoint`). Collective:
every rank calls these."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
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
from mtnlg.formats.checkpoint.catalog import prune_checkpoints, step_dirname
from mtnlg.formats.checkpoint.integrity import (
    CHECKSUMS_DIR,
    FORMAT,
    CheckpointDamaged,
    _rank_files,
    _verify,
    verify_or_raise,
    write_checksums,
    written_whole,
)
from mtnlg.formats.checkpoint.ranged_reader import _RangedShardReader
from mtnlg.formats.checkpoint.safe_load import _SafeLoadPlanner, _SafeReader
from mtnlg.formats.rundir import LATEST, RUN_CONFIG, TRAINER_STATE
from mtnlg.progress import get_logger

log = get_logger("mtnlg.formats.checkpoint")  # one logger for the whole format


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a file-size limit, an I/O error)."""


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


# --------------------------------------------------------------------------- save / load


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

    def _side_files(self, target: str) -> None:
        # looked up on the package at call time, so that replacing
        # ``checkpoint._write_side_files`` (a test damages a checkpoint as it lands) is heard
        from mtnlg.formats import checkpoint

        checkpoint._write_side_files(target, self.meta, self.config_text, self.extra_files)

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
                self._side_files(self.where)
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
                self._side_files(self.final)
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
