"""The checkpoints of a directory: ``step_XXXXXXXX/`` entries, the ``latest`` pointer, the
one to resume from (:func:`latest_good`), pruning, and a checkpoint found from a path."""

from __future__ import annotations

import os
import re

import torch.distributed as dist

from mtnlg import storage
from mtnlg.dist import broadcast_object
from mtnlg.formats.checkpoint.integrity import CheckpointDamaged, verify_checkpoint
from mtnlg.formats.rundir import CHECKPOINTS_DIR, LATEST, TRAINER_STATE
from mtnlg.progress import get_logger

log = get_logger("mtnlg.formats.checkpoint")  # one logger for the whole format

_STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


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
    rank = dist.get_rank() if dist.is_initialized() else 0
    answer = _pick_latest_good(directory, tuple(skip)) if rank == 0 else None
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
