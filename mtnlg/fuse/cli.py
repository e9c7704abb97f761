"""``mtnlg fuse CHECKPOINT --output DIR [--dtype fp32|bf16|fp16] [--hf]``.

CHECKPOINT is a training run directory (its ``checkpoints/latest`` is used), a checkpoints
directory with ``latest``, or one ``step_XXXXXXXX`` checkpoint; local, gs:// or s3://.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run dir, checkpoints dir or step_XXXXXXXX checkpoint (local, gs:// or s3://)")
    p.add_argument("--output", "-o", required=True, help="fused model directory to write (local, gs:// or s3://)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights dtype (default fp32)")
    p.add_argument("--hf", action="store_true", help="also write a Hugging Face model directory to OUTPUT/hf")
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors file before splitting into shards, e.g. 500MB, 2GB (default 2GB)")
    p.add_argument("--no-verify", action="store_true", help="skip the logit check against the checkpoint")


def parse_size(text: str) -> int:
    """``"500MB"`` -> 500_000_000; plain numbers are bytes."""
    t = text.strip().upper()
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            num = t[: -len(u)].strip()
            break
    else:
        u, num = "B", t
    try:
        value = int(float(num) * units[u])
    except ValueError:
        raise ValueError(f"--max-shard-size: cannot read {text!r} (use e.g. 500MB or 2GB)") from None
    if value < 1:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return value


def main(args: argparse.Namespace) -> int:
    from mtnlg.fuse.fuse import fuse_checkpoint

    result = fuse_checkpoint(args.checkpoint, args.output, dtype=args.dtype, hf=args.hf,
                             max_shard_bytes=parse_size(args.max_shard_size),
                             verify=False if args.no_verify else None)
    print(json.dumps(result, indent=2, default=str))
    return 0
