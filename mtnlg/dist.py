"""Process-group set-up from the launcher's environment, and small collective helpers.

Every training process reads its place in the job from the variables that ``torchrun``
and the Kubeflow Training Operator (PyTorchJob) both set: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. A process started without them (a test
or a notebook calling :func:`mtnlg.train.trainer.train` directly) is a world of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from mtnlg import storage


@dataclass(frozen=True)
class ProcessEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def process_env() -> ProcessEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (defaults: a single process) and check them."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    # A process without LOCAL_RANK (one process per PyTorchJob pod) is alone on its node.
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return ProcessEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device_type: str, timeout_s: float | None = None) -> ProcessEnv:
    """Join the job's default process group (gloo on CPU, NCCL on GPU); idempotent.
    ``timeout_s`` bounds every collective (a rank that does not arrive fails the others
    after that long, rather than hanging them; None = PyTorch's default, 10 minutes)."""
    env = process_env()
    if dist.is_initialized():
        return env
    if env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"environment variable {name} is not set (WORLD_SIZE={env.world_size}); "
                             "start the job with torchrun or a PyTorchJob")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    import datetime

    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None,
                            device_id=torch.device("cuda", env.local_rank) if device_type == "cuda" else None)
    return env


# ---- host-device synchronisation -------------------------------------------------------

_SYNCING = frozenset({"item", "tolist", "numpy", "nonzero", "masked_select", "__bool__", "__float__",
                      "__int__", "__index__", "__complex__"})
_host_reads = threading.local()


@contextlib.contextmanager
def host_side() -> Iterator[None]:
    """Mark reads of host (CPU) tensors that are not synchronisations with a device (a
    gloo flag, say), so that :class:`SyncCounter` does not count them."""
    old = getattr(_host_reads, "on", False)
    _host_reads.on = True
    try:
        yield
    finally:
        _host_reads.on = old


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the tensor reads that block the host until the device catches up (``.item()``,
    ``float(t)``, ``bool(t)``, ``.tolist()``, ``.numpy()``, data-dependent shapes): on a GPU
    each one stalls the CPU's queueing of work. It counts them on any device, so that a CPU
    test sees what a GPU run would pay. ``calls`` names them in order."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCING and not getattr(_host_reads, "on", False):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class HostFlags:
    """Agree on a few booleans across ranks (a SIGTERM received by some rank) over the CPU,
    without a device synchronisation: a gloo group beside NCCL on GPUs, the default group
    on CPUs."""

    def __init__(self, device_type: str):
        self.group = None
        self.active = dist.is_initialized() and dist.get_world_size() > 1
        if self.active and device_type != "cpu":
            self.group = dist.new_group(backend="gloo")

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, group=self.group)
        with host_side():
            return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few Python floats over all ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks, as a new tensor on ``t``'s device (not read back)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def first_error(message: str | None) -> str | None:
    """Collective: the first non-empty ``message`` over the ranks (by rank), on every rank,
    so that a problem one rank finds stops all of them alike."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m), None)


@contextlib.contextmanager
def node_local_copy(paths: list[str]) -> Iterator[list[str]]:
    """Local paths holding ``paths`` (files or directories), downloaded once per node for gs:// and s3://.

    Local paths are used in place. ``gs://`` and ``s3://`` ones are downloaded by the node's local rank 0
    into a directory every rank of the node can read, one sub-directory per parent folder,
    so that ``x.bin`` and ``x.idx`` from the same folder land side by side; every rank waits
    for the download, and the copies are removed when all ranks are done. Collective: every
    rank must call it with the same paths.
    """
    remote = [p for p in paths if storage.is_remote(p)]
    if not remote:
        yield list(paths)
        return
    env = process_env()
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT") or str(os.getpid())
    key = hashlib.sha1("|".join([job, *remote]).encode()).hexdigest()[:16]
    root = os.path.join(tempfile.gettempdir(), f"mtnlg-stage-{key}")
    owner = env.local_rank == 0

    def local_of(uri: str) -> str:
        parent, _, name = uri.rstrip("/").rpartition("/")
        return os.path.join(root, hashlib.sha1(parent.encode()).hexdigest()[:12], name or "object")

    try:
        if owner:
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            for uri in remote:
                if storage.isdir(uri):
                    storage.copy_tree(uri, local_of(uri))
                else:
                    storage.copy(uri, local_of(uri))
        barrier()
        yield [local_of(p) if storage.is_remote(p) else p for p in paths]
    finally:
        barrier()
        if owner:
            shutil.rmtree(root, ignore_errors=True)
