"""``mtnlg verify PATH``: is a training checkpoint or a fused model intact?

PATH is a checkpoint (``.../checkpoints/step_00000020``), a run directory or its
``checkpoints/`` (every checkpoint in it is checked, newest first, and the one a resume
would use is named), or a fused model directory (``manifest.json``); local, gs:// or s3://.
Each problem names its file: missing, truncated, altered (sha256), unreadable metadata.
Exit status 0 when intact (for a run: when a resume would find an intact checkpoint), 1
otherwise.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a checkpoint, a run directory, or a fused model directory (local, gs://, s3://)")


def main(args: argparse.Namespace) -> int:
    from mtnlg import storage
    from mtnlg.formats import checkpoint as ckpt
    from mtnlg.formats.rundir import CHECKPOINTS_DIR, MANIFEST, TRAINER_STATE

    path = args.path.rstrip("/")
    if storage.exists(storage.join(path, MANIFEST)):
        from mtnlg.formats.manifest import read_manifest, verify_files

        try:
            verify_files(path, read_manifest(path))
        except (OSError, ValueError) as e:
            print(f"DAMAGED fused model {path}: {e}")
            return 1
        print(f"OK fused model {path}: every file matches manifest.json")
        return 0
    if storage.exists(storage.join(path, TRAINER_STATE)):
        targets, directory = [path], None
    else:
        directory = next((d for d in (storage.join(path, CHECKPOINTS_DIR), path)
                          if ckpt.list_checkpoints(d)), None)
        if directory is None:
            print(f"{path}: no checkpoint, run directory or fused model here")
            return 1
        targets = [p for _, p, _ok in reversed(ckpt.list_checkpoints(directory))]
    good = []
    for t in targets:
        problems = ckpt.verify_checkpoint(t)  # in place: a remote file's hash streams through
        if problems:
            print(f"DAMAGED {t}:\n  " + "\n  ".join(problems))
        else:
            print(f"OK {t}")
            good.append(t)
    if directory is None:
        return 0 if good else 1
    latest = ckpt.read_latest(directory)
    if good:
        note = "" if good[0] == latest else f" (latest names {latest}, which is not intact)"
        print(f"a resume would use {good[0]}{note}")
        return 0
    print(f"no intact checkpoint in {directory}")
    return 1
