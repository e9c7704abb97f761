"""``mtnlg fuse CHECKPOINT --output DIR [--config FILE] [--dtype D] [--no-hf] [KEY=VALUE ...]``.

CHECKPOINT is a training run directory (its ``checkpoints/latest`` is used), a checkpoints
directory with ``latest``, or one ``step_XXXXXXXX`` checkpoint; local, gs:// or s3://. The
settings are a ``FuseConfig`` (the pipeline's fuse step reads the same): a YAML file,
``KEY=VALUE`` overrides, and the flags, which are shortcuts for its keys; their defaults are
the config's (fp32, a Hugging Face export, 2 GiB shards, verification up to 2B parameters).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run dir, checkpoints dir or step_XXXXXXXX checkpoint (local, gs:// or s3://)")
    p.add_argument("--output", "-o", required=True, help="fused model directory to write (local, gs:// or s3://)")
    p.add_argument("--config", default=None, help="a FuseConfig YAML file")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="dtype=: weights dtype (default fp32)")
    p.add_argument("--hf", dest="hf", action="store_true", default=None,
                   help="hf=true: also write a Hugging Face model directory to OUTPUT/hf (the default)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="hf=false: the fused model only")
    p.add_argument("--max-shard-size", default=None,
                   help="max_shard_bytes=: largest safetensors file before splitting into shards, e.g. 500MB, 2GiB "
                        "(default 2GiB)")
    p.add_argument("--no-verify", action="store_true", help="verify=false: skip the logit check against the checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="FuseConfig settings, e.g. dtype=bf16")


def fuse_config(args: argparse.Namespace):
    """The ``FuseConfig`` of a ``mtnlg fuse`` command line: file, flags, then overrides."""
    from mtnlg.config import load_config
    from mtnlg.fuse.config import FuseConfig

    flags = []
    if args.dtype:
        flags.append(f"dtype={args.dtype}")
    if args.hf is not None:
        flags.append(f"hf={str(args.hf).lower()}")
    if args.max_shard_size:
        flags.append(f"max_shard_bytes={parse_size(args.max_shard_size)}")
    if args.no_verify:
        flags.append("verify=false")
    return load_config(FuseConfig, args.config, [*flags, *args.overrides])


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

    cfg = fuse_config(args)
    result = fuse_checkpoint(args.checkpoint, args.output, dtype=cfg.dtype, hf=cfg.hf,
                             max_shard_bytes=cfg.max_shard_bytes, verify=cfg.verify)
    print(json.dumps(result, indent=2, default=str))
    return 0
