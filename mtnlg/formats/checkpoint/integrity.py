"""What an intact checkpoint is: every rank's checksums (size and sha256 of each file it
wrote), checked before a load (:func:`verify_checkpoint`) and after a save
(:func:`written_whole`, sizes only); a missing, truncated or altered file, or unreadable
metadata, is :class:`CheckpointDamaged` naming the file."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from mtnlg import storage
from mtnlg.formats.checkpoint.safe_load import load_metadata_bytes
from mtnlg.formats.rundir import TRAINER_STATE
from mtnlg.progress import get_logger

log = get_logger("mtnlg.formats.checkpoint")  # one logger for the whole format

FORMAT = "mtnlg-dcp-1"
CHECKSUMS_DIR = "checksums"


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match its checksums (or are missing, or unreadable)."""


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
