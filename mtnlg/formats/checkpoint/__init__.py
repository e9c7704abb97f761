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

The modules, one idea each: ``integrity`` (checksums, :func:`verify_checkpoint`,
:func:`written_whole`), ``safe_load`` (the allow-listed metadata unpickler, the safe DCP
reader and planner), ``ranged_reader`` (a remote checkpoint read in place with ranged
requests), ``catalog`` (``latest``, listing, :func:`latest_good`, pruning,
:func:`resolve_checkpoint`) and ``save_load`` (:func:`save_checkpoint`,
:class:`PendingCheckpoint`, :func:`load_checkpoint`, RNG states). Import the names from here.
"""

from __future__ import annotations

from mtnlg.formats.checkpoint.catalog import (
    latest_good,
    list_checkpoints,
    prune_checkpoints,
    read_latest,
    resolve_checkpoint,
    step_dirname,
)
from mtnlg.formats.checkpoint.integrity import (
    CHECKSUMS_DIR,
    FORMAT,
    CheckpointDamaged,
    file_digest,
    verify_checkpoint,
    verify_or_raise,
    write_checksums,
    written_whole,
)
from mtnlg.formats.checkpoint.safe_load import check_metadata, load_metadata_bytes
from mtnlg.formats.checkpoint.save_load import (
    CheckpointSaveError,
    PendingCheckpoint,
    _write_side_files,  # noqa: F401 - replaced by a test to damage a checkpoint as it lands
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mtnlg.formats.rundir import TRAINER_STATE

__all__ = [
    "CHECKSUMS_DIR", "FORMAT", "TRAINER_STATE", "CheckpointDamaged", "CheckpointSaveError", "PendingCheckpoint",
    "check_metadata", "file_digest", "latest_good", "list_checkpoints", "load_checkpoint", "load_metadata_bytes",
    "prune_checkpoints", "read_latest", "resolve_checkpoint", "rng_state", "save_checkpoint", "set_rng_state",
    "step_dirname", "verify_checkpoint", "verify_or_raise", "write_checksums", "written_whole",
]
