"""``manifest.json``: what a model directory holds, with a sha256 for every file.

    {
      "format": "mtnlg-fused-1",
      "files":   {"model.safetensors": {"sha256": "...", "bytes": 123, "tensors": [...]},
                  "config.json": {...}, "tokenizer.model": {...}, ...},
      "tensors": {"tok_embeddings.weight": {"shape": [512, 64], "dtype": "F32",
                                            "file": "model.safetensors"}, ...},
      ...provenance (source checkpoint, step, dtype, verification)...
    }

The manifest itself is not listed (it cannot hold its own checksum). Verification reads
every file once, in chunks, and names the file (and the tensors inside it) that does not
match.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mtnlg import storage
from mtnlg.formats.rundir import MANIFEST
from mtnlg.formats.sharded_safetensors import sha256_file

FORMAT = "mtnlg-fused-1"


def hash_files(directory: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for files of a local directory."""
    out = {}
    for n in names:
        p = os.path.join(directory, n)
        out[n] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p)}
    return out


def write_manifest(directory: str, files: dict[str, dict[str, Any]], tensors: dict[str, dict[str, Any]],
                   **extra: Any) -> dict[str, Any]:
    manifest = {"format": FORMAT, **extra, "files": dict(sorted(files.items())), "tensors": tensors}
    save_manifest(directory, manifest)
    return manifest


def save_manifest(directory: str, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    if storage.is_remote(directory):
        storage.write_text(storage.join(directory, MANIFEST), text)
    else:
        # a plain write: the directory is a staging one, made visible as a whole by a
        # rename; an fsync here would also force every shard just written to disk
        with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
            f.write(text)


def not_a_fused_model(directory: str, path: str) -> FileNotFoundError:
    """The error for a directory that lacks a fused model's ``path``: a training run is named
    as one, with the fuse command that makes its model."""
    from mtnlg.formats.rundir import CHECKPOINTS_DIR

    if storage.exists(storage.join(directory, CHECKPOINTS_DIR)):
        return FileNotFoundError(f"{directory} is a training run, not a fused model: fuse it first, "
                                 f"mtnlg fuse {directory} --output {directory.rstrip('/')}-model")
    return FileNotFoundError(f"{path} does not exist: {directory} is not a fused model directory "
                             "(write one with `mtnlg fuse CHECKPOINT --output DIR`)")


def read_manifest(directory: str) -> dict[str, Any]:
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        raise not_a_fused_model(directory, path)
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path}: unknown manifest format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def _damaged_tensor(path: str, names: list[str], tensors: dict[str, dict[str, Any]]) -> str:
    """Which tensor of a safetensors file no longer matches its recorded sha256."""
    import hashlib

    from mtnlg.formats.sharded_safetensors import read_header

    try:
        header, start = read_header(path)
    except ValueError as e:
        return f"{e}; it holds tensors {names[:3]}{'...' if len(names) > 3 else ''}"
    with storage.open_read(path, "rb") as f:
        for name in names:
            rec = tensors.get(name, {})
            entry = header.get(name)
            if entry is None:
                return f"tensor {name!r} is missing from its header"
            if list(entry.get("shape", [])) != list(rec.get("shape", entry.get("shape", []))):
                return f"tensor {name!r} has shape {entry.get('shape')}, manifest says {rec.get('shape')}"
            if "sha256" not in rec:
                continue
            a, b = entry["data_offsets"]
            f.seek(start + a)
            if hashlib.sha256(f.read(b - a)).hexdigest() != rec["sha256"]:
                return f"tensor {name!r} is damaged (its sha256 does not match)"
    return "no single tensor is damaged (header or padding bytes changed)"


def safe_relative(name: Any, where: str) -> str:
    """``name`` if it is a plain relative path inside its directory; ValueError for an
    absolute path, ``..``, empty parts or a non-string (a manifest or index naming a file
    outside the model directory)."""
    if not isinstance(name, str):
        raise ValueError(f"{where}: file name {name!r} is not a string")
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{where}: file name {name!r} would leave the model directory")
    return name


def verify_files(directory: str, manifest: dict[str, Any]) -> None:
    """Check that every listed file exists with its recorded size and sha256; a mismatch
    in a weights file names the damaged tensor."""
    tensors = manifest.get("tensors", {})
    for name, info in manifest["files"].items():
        path = storage.join(directory, safe_relative(name, storage.join(directory, MANIFEST)))
        held = info.get("tensors") or []
        what = f" (holds {len(held)} tensors, first {held[0]!r})" if held else ""
        if not storage.exists(path):
            raise FileNotFoundError(f"{path} is missing{what}")
        size = storage.size(path)
        if "bytes" in info and size != info["bytes"]:
            raise ValueError(f"{path}: size {size} bytes, manifest says {info['bytes']}{what}")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            detail = f": {_damaged_tensor(path, held, tensors)}" if held else ""
            raise ValueError(f"{path}: sha256 checksum mismatch (file {digest[:16]}..., manifest "
                             f"{info['sha256'][:16]}...){detail}")
