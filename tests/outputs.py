"""What a step wrote, as bytes by relative name, for comparing two runs: JSON and
JSON-lines files with their wall-clock figures masked (the only thing two runs of a step may
disagree on), TensorBoard event files and plots (they embed wall-clock times) left out."""

from __future__ import annotations

import json

from mtnlg import storage

# wall-clock figures, by key
CLOCK = {"seconds", "elapsed_s", "eta_s", "step_time_s", "tokens_per_s", "samples_per_s", "tflops", "mfu",
         "wall_s", "time", "timestamp", "started", "finished"}


def scrub(v):
    if isinstance(v, dict):
        return {k: ("<clock>" if k in CLOCK or k.endswith(("_per_s", "_seconds")) else scrub(x)) for k, x in v.items()}
    if isinstance(v, list):
        return [scrub(x) for x in v]
    return v


def comparable(rel: str, data: bytes) -> bytes:
    """``data`` of the file ``rel`` with wall-clock figures masked. Checkpoint files are kept
    as written (they hold no clock), as are extracted documents."""
    if rel.startswith("checkpoints/") or "/checkpoints/" in rel:
        return data
    if rel.endswith(".json"):
        return json.dumps(scrub(json.loads(data)), sort_keys=True).encode()
    if rel.endswith(".jsonl") and "extracted/" not in rel and not rel.split("/")[-1].startswith("part-"):
        return b"\n".join(json.dumps(scrub(json.loads(line)), sort_keys=True).encode()
                          for line in data.splitlines() if line)
    return data


def ignored(rel: str) -> bool:
    return "tensorboard/" in rel or rel.endswith((".png", ".html"))


def snapshot(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (local, gs:// or s3://) by relative name, comparable."""
    out = {}
    base = root.rstrip("/")
    for f in storage.list_files(root):
        rel = f[len(base):].lstrip("/")
        if not ignored(rel):
            out[rel] = comparable(rel, storage.read_bytes(f))
    return out
