"""``mtnlg reshard CHECKPOINT --tp N --pp M --output DIR``.

Writes ``DIR/step_XXXXXXXX`` + ``DIR/latest`` for the new layout and prints the overrides
that resume training from it (see docs/fuse.md).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run dir, checkpoints dir or step_XXXXXXXX checkpoint (local, gs:// or s3://)")
    p.add_argument("--tp", type=int, required=True, help="new tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="new pipeline-parallel degree (default 1)")
    p.add_argument("--output", "-o", required=True, help="checkpoints directory to write (local, gs:// or s3://)")


def main(args: argparse.Namespace) -> int:
    from mtnlg.fuse.reshard import reshard_checkpoint

    result = reshard_checkpoint(args.checkpoint, args.output, tp=args.tp, pp=args.pp)
    print(json.dumps(result, indent=2))
    print("resume with: mtnlg train --nproc N ... " + " ".join(result["resume_overrides"]))
    return 0
