"""Run a function in N CPU processes joined by a gloo process group (for tests).

    results = run_distributed(fn, world_size=2, args=(...,))

``fn(rank, world_size, *args)`` runs in each process after ``init_process_group``; its
return value (plain data: numbers, strings, lists, dicts) comes back in a list indexed by
rank. An exception in any process fails the call with that process's traceback.
Processes start with ``spawn`` (a fresh interpreter each: a few seconds), so batch many
checks into one call.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    from mtnlg.process import exit_process

    exit_process(0)  # as the training processes end (an exception above still ends through the interpreter)


def run_distributed(fn, world_size: int, args: tuple = ()) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size,
                 join=True)
        results = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"{r}.json")) as f:
                results.append(json.load(f))
        return results
