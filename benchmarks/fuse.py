"""Fuse throughput next to a plain file copy of the checkpoint's shards.

    .venv/bin/python benchmarks/fuse.py                   # small-20m, TP=2 checkpoint
    .venv/bin/python benchmarks/fuse.py --preset gpt-125m --repeat 2

1. Writes a real TP=2 training checkpoint (model + AdamW state, DCP shards from two gloo
   processes, through ``mtnlg.formats.checkpoint.save_checkpoint``) for ``--preset``.
2. After one untimed warm-up fuse (imports), times, alternating ``--repeat`` times and keeping the best of each:
   * ``copy``: ``shutil.copyfile`` of every shard file (``__*_0.distcp``): the floor for
     moving the checkpoint's bytes through this disk;
   * ``fuse``: ``fuse_checkpoint(..., verify=False)``: read every model tensor's chunks,
     assemble, write sharded safetensors with sha256 checksums, config, tokenizer and
     manifest;
   * ``fuse+verify``: the same plus the logit check against the trainer's DCP loader.
   Each timed run starts after ``os.sync()``, so none pays for another's write-back; the
   shard files stay in the page cache for both contenders.
3. Reports MB/s: for copy, shard bytes copied per second; for fuse, fused weight bytes
   written per second (fuse reads only the model's share of the shards, about a third
   with Adam, so the two figures measure different amounts of data: both are printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import socket
import tempfile
import time

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_checkpoint(rank: int, world: int, port: int, preset: str, out: str, tok_dir: str) -> None:
    """One process of the TP=``world`` job that writes the checkpoint."""
    import torch.distributed as dist

    from mtnlg.config import dump_yaml, to_dict
    from mtnlg.formats.checkpoint import save_checkpoint
    from mtnlg.model.gpt import GPT
    from mtnlg.model.presets import get_preset
    from mtnlg.parallel.config import ParallelConfig
    from mtnlg.parallel.dims import ParallelDims
    from mtnlg.parallel.parallelize import parallelize_gpt
    from mtnlg.train.config import TrainRunConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = dataclasses.replace(get_preset(preset), vocab_size=512, dropout=0.0, attention_dropout=0.0)
        pc = ParallelConfig(tp=world)
        dims = ParallelDims.build(pc, world, cfg)
        torch.manual_seed(0)
        model = parallelize_gpt(GPT(cfg, tp=world), dims.build_mesh("cpu"), dims)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():
            p.grad = torch.ones_like(p) * 1e-3
        opt.step()  # creates the Adam moments
        run = TrainRunConfig(model=cfg, parallel=pc, output=out, data=dataclasses.replace(TrainRunConfig().data,
                                                                                            path=tok_dir))
        state = {"consumed_samples": 0, "layout": {"tp": world, "dp": 1, "pp": 1}, "model": to_dict(cfg),
                 "tokenizer": os.path.join(tok_dir, "tokenizer.model")}
        save_checkpoint(os.path.join(out, "checkpoints"), 1, model, opt, state, config_text=dump_yaml(run),
                        extra_files={n: os.path.join(tok_dir, n) for n in ("tokenizer.model", "tokenizer.json")})
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-20m")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", default=None, help="keep the checkpoint here (default: a temporary directory)")
    args = p.parse_args(argv)

    import sentencepiece as spm
    import torch.multiprocessing as mp

    from mtnlg.formats.tokenizer import Tokenizer
    from mtnlg.fuse.fuse import fuse_checkpoint

    with tempfile.TemporaryDirectory(prefix="mtnlg-bench-fuse-") as tmp:
        if args.workdir:
            tmp = os.path.abspath(args.workdir)
            shutil.rmtree(tmp, ignore_errors=True)
        tok_dir = os.path.join(tmp, "tok")
        os.makedirs(tok_dir)
        text = "the quick brown fox jumps over the lazy dog " * 200
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("dog")), model_prefix=f"{tok_dir}/tokenizer",
                                       vocab_size=64, model_type="bpe", eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2)
        with open(os.path.join(tok_dir, "tokenizer.json"), "w") as f:
            json.dump(Tokenizer(f"{tok_dir}/tokenizer.model").metadata(), f)
        run = os.path.join(tmp, "run")
        t0 = time.perf_counter()
        mp.spawn(_write_checkpoint, args=(args.tp, _free_port(), args.preset, run, tok_dir), nprocs=args.tp, join=True)
        write_s = time.perf_counter() - t0
        ckpt = os.path.join(run, "checkpoints", "step_00000001")
        shards = sorted(glob.glob(os.path.join(ckpt, "__*_0.distcp")))
        shard_bytes = sum(os.path.getsize(s) for s in shards)

        fuse_checkpoint(run, os.path.join(tmp, "warmup"), verify=True)  # imports and first-use costs
        shutil.rmtree(os.path.join(tmp, "warmup"))
        best = {"copy": float("inf"), "fuse": float("inf"), "fuse+verify": float("inf")}
        weight_bytes = 0
        for i in range(args.repeat):
            dst = os.path.join(tmp, f"copy{i}")
            os.makedirs(dst)
            os.sync()  # every timed run starts with no dirty pages to write back
            t0 = time.perf_counter()
            for s in shards:
                shutil.copyfile(s, os.path.join(dst, os.path.basename(s)))
            best["copy"] = min(best["copy"], time.perf_counter() - t0)
            shutil.rmtree(dst)
            for name, verify in (("fuse", False), ("fuse+verify", True)):
                os.sync()
                t0 = time.perf_counter()
                r = fuse_checkpoint(run, os.path.join(tmp, f"{name}{i}"), verify=verify)
                best[name] = min(best[name], time.perf_counter() - t0)
                weight_bytes = r["bytes"]
                shutil.rmtree(os.path.join(tmp, f"{name}{i}"))
    mb = 1e6
    result = {
        "preset": args.preset, "tp": args.tp, "checkpoint_write_s": write_s,
        "shard_files": len(shards), "shard_mb": shard_bytes / mb, "fused_weight_mb": weight_bytes / mb,
        "copy_mb_per_s": shard_bytes / mb / best["copy"],
        "fuse_mb_per_s": weight_bytes / mb / best["fuse"],
        "fuse_verify_mb_per_s": weight_bytes / mb / best["fuse+verify"],
        "copy_s": best["copy"], "fuse_s": best["fuse"], "fuse_verify_s": best["fuse+verify"],
    }
    result["fuse_vs_copy"] = result["fuse_mb_per_s"] / result["copy_mb_per_s"]
    print(json.dumps(result, indent=2))
    print(f"{args.preset} TP={args.tp}: copy {result['copy_mb_per_s']:.0f} MB/s of shards "
          f"({result['shard_mb']:.0f} MB), fuse {result['fuse_mb_per_s']:.0f} MB/s of weights "
          f"({result['fused_weight_mb']:.0f} MB; {result['fuse_vs_copy']:.2f}x copy), "
          f"with verification {result['fuse_verify_mb_per_s']:.0f} MB/s")
    return result


if __name__ == "__main__":
    main()
