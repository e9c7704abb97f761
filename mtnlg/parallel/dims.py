'''``ParallelDims``: the parallel degrees of a run, checked once, before any process group.

Ranks are laid out on one 3-D mesh ``(pp, dp, tp)``, every dimension present even when its
size is 1, with the tensor-parallel dimension innermost, as in Megatron: the ranks of one tensor-parallel group are consecutive, so on a GPU cluster
they share a node (and NVLink) while data-parallel traffic crosses nodes.

Worked example: 16 ranks (2 nodes x 8 GPUs), ``tp=4``, ``pp=1``, so ``dp=4``::

    mesh (dp x tp):            node 0                        node 1
                   tp=0 tp=1 tp=2 tp=3
        dp=0     [   0,   1,   2,   3 ]  <- tensor-parallel group 0
        dp=1     [   4,   5,   6,   7 ]
        dp=2     [   8,   9,  10,  11 ]
        dp=3     [  12,  13,  14,  15 ]
                    ^ data-parallel group 0: ranks 0, 4, 8, 12

    4 tensor-parallel groups: [0,1,2,3] [4,5,6,7] [8,9,10,11] [12,13,14,15]
    4 data-parallel groups:   [0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]
    rank r: tp_rank = r % tp, dp_rank = r // tp

Rank 6 holds the third quarter (tp_rank 2) of every sharded weight and reads data-parallel
slice 1 of each global batch; its gradients are averaged with ranks 2, 10 and 14, which
hold the same quarter. ``tp_groups()`` / ``dp_groups()`` return these lists without
starting any process.

Context parallelism (``cp > 1``, ``mtnlg.parallel.cp``) adds a dimension between data and
tensor parallelism: the mesh is ``(pp, dp, cp, tp)`` and rank
``r = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank``. The ``cp`` ranks of one
``(pp, dp, tp)`` coordinate read the same rows and each hold two chunks of every sequence;
gradients are averaged over ``dp * cp`` ranks. 8 ranks, ``cp=2, tp=2`` (``dp=2``):
tensor-parallel groups ``[0,1] [2,3] [4,5] [6,7]``, context-parallel groups ``[0,2] [1,3]
[4,6] [5,7]``, data-parallel groups ``[0,4] [1,5] [2,6] [3,7]``. With ``cp = 1`` (the
default) every formula below holds as written.

Pipeline parallelism (``pp > 1``) grows the outermost dimension: rank
``r = pp_rank * dp * tp + dp_rank * tp + tp_rank``, so each stage is a contiguous block of ``dp * tp`` ranks (a node, say) and only stage-boundary activations
cross between blocks. With 8 ranks, ``pp=2, tp=2`` (``dp=2``): stage 0 is ranks 0-3, stage 1
ranks 4-7; pipeline groups ``[0,4] [1,5] [2,6] [3,7]`` (same dp and tp coordinates),
tensor-parallel groups ``[0,1] [2,3] [4,5] [6,7]``, data-parallel groups ``[0,2] [1,3]
[4,6] [5,7]``. Stage ``s`` owns layers ``s * L/pp .. (s+1) * L/pp - 1`` (``num_layers``
must divide by ``pp``); stage 0 also holds the embeddings, the last stage the final norm
and the output head.
'''

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.config import ConfigError
from mtnlg.model.config import ModelConfig
from mtnlg.parallel.config import ParallelConfig
from mtnlg.progress import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world_size: int
    sequence_parallel: bool
    fsdp: bool
    num_layers: int = 0
    virtual_stages: int = 1
    cp: int = 1

    @classmethod
    def build(cls, cfg: ParallelConfig, world_size: int, model_cfg: ModelConfig) -> "ParallelDims":
        """Check ``cfg`` against the world size and the model; every message names numbers.
        The one place where degrees and divisibility are checked (``cfg``'s own fields were
        checked when it was loaded)."""
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        tp, pp, cp = cfg.tp, cfg.pp, cfg.cp
        cp_text = " * parallel.cp" if cp > 1 else ""
        cp_num = f" * {cp}" if cp > 1 else ""
        if world_size % (tp * pp * cp):
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp * "
                              f"parallel.pp{cp_text} = {tp} * {pp}{cp_num} = {tp * pp * cp}")
        dp = world_size // (tp * pp * cp) if cfg.dp == -1 else cfg.dp
        if dp * tp * pp * cp != world_size:
            raise ConfigError(f"parallel.dp * parallel.tp * parallel.pp{cp_text} = {dp} * {tp} * {pp}{cp_num} = "
                              f"{dp * tp * pp * cp}, but the world size is {world_size}")
        v = cfg.pp_virtual
        if v > 1 and pp == 1:
            raise ConfigError(f"parallel.pp_virtual={v} needs parallel.pp > 1 (virtual stages "
                              f"interleave the layers of a pipeline)")
        if pp > 1 and model_cfg.num_layers % (pp * v):
            raise ConfigError(f"model.num_layers={model_cfg.num_layers} is not divisible by "
                              f"parallel.pp={pp}" + (f" x parallel.pp_virtual={v} = {pp * v}" if v > 1 else "")
                              + " (each pipeline stage holds an equal share)")
        m = model_cfg
        if m.num_heads % tp:
            raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={tp}")
        if m.kv_heads % tp:
            raise ConfigError(f"model.num_kv_heads={m.kv_heads} is not divisible by "
                              f"parallel.tp={tp} (each rank needs whole key/value heads)")
        if m.ffn_size % tp:
            raise ConfigError(f"model ffn size {m.ffn_size} is not divisible by parallel.tp={tp}")
        vocab = m.padded_vocab_size(tp)
        if vocab % tp:  # cannot happen with padded_vocab_size, kept as the stated invariant
            raise ConfigError(f"padded vocabulary {vocab} is not divisible by parallel.tp={tp}")
        sp = cfg.sequence_parallel
        if sp and tp == 1:
            log.warning("parallel.sequence_parallel=true has no effect with parallel.tp=1; "
                        "running without it")
            sp = False
        if sp and m.seq_length % tp:
            raise ConfigError(f"model.seq_length={m.seq_length} is not divisible by "
                              f"parallel.tp={tp}, which sequence parallelism needs")
        if cp > 1:
            cls._check_context_parallel(cfg, m, tp, cp, sp)
        if cfg.fsdp and dp * cp == 1:
            log.warning("parallel.fsdp=true with a data-parallel degree of 1 shards nothing; "
                        "running without data parallelism")
        return cls(dp=dp, tp=tp, pp=pp, world_size=world_size, sequence_parallel=sp,
                   fsdp=cfg.fsdp and dp * cp > 1, num_layers=m.num_layers,
                   virtual_stages=v if pp > 1 else 1, cp=cp)

    @staticmethod
    def _check_context_parallel(cfg: ParallelConfig, m: ModelConfig, tp: int, cp: int, sp: bool) -> None:
        """The rules of ``parallel.cp > 1`` (``mtnlg.parallel.cp``). Every pipeline layout and
        schedule composes with it: each stage runs the rank's positions."""
        if m.seq_length % (2 * cp):
            raise ConfigError(f"model.seq_length={m.seq_length} is not divisible by 2 * parallel.cp = "
                              f"{2 * cp} (each context-parallel rank holds two equal chunks of the "
                              f"sequence, an early and a late one, so causal work is balanced)")
        if sp and (m.seq_length // cp) % tp:
            raise ConfigError(f"model.seq_length / parallel.cp = {m.seq_length} / {cp} = "
                              f"{m.seq_length // cp} is not divisible by parallel.tp={tp}, which "
                              f"sequence parallelism needs")
        if cfg.compile:
            raise ConfigError(f"parallel.cp={cp} with parallel.compile=true: the context-parallel "
                              f"attention core is not compiled yet; set parallel.compile=false")

    def check_batches(self, pp_schedule: str, micro_batch_size: int, global_batch_size: int,
                      ramp_batch_sizes: tuple[int, ...] = ()) -> None:
        """The batch rules of the layout: the global batch divides into micro-batches of
        ``micro_batch_size`` on every data-parallel rank; a batch-size ramp-up's sizes are
        rounded down to that unit step by step (as Megatron-LM's
        ``decrease_batch_size_if_needed``), so its start must reach one unit; the pipeline
        schedule gets micro-batch counts it can run: 1F1B at least ``pp`` at the full batch
        (ramp-up steps with fewer run fill-drain, as GPipe), interleaved 1F1B a count that
        is a multiple of its rounds (``max(1, n // pp)``) at every size."""
        unit = micro_batch_size * self.dp
        if global_batch_size % unit:
            raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by "
                              f"train.micro_batch_size={micro_batch_size} x data-parallel degree "
                              f"{self.dp} = {unit}")
        if ramp_batch_sizes and min(ramp_batch_sizes) < unit:
            raise ConfigError(f"train.rampup.start={min(ramp_batch_sizes)} is smaller than one micro-batch "
                              f"per data-parallel rank: train.micro_batch_size={micro_batch_size} x "
                              f"data-parallel degree {self.dp} = {unit}")
        if self.pp == 1:
            return
        full = global_batch_size // unit
        if pp_schedule == "1f1b" and self.virtual_stages == 1 and full < self.pp:
            raise ConfigError(f"parallel.pp_schedule=1f1b needs at least parallel.pp={self.pp} "
                              f"micro-batches per step, but train.global_batch_size={global_batch_size} "
                              f"with train.micro_batch_size={micro_batch_size} x data-parallel degree "
                              f"{self.dp} gives {full}; use parallel.pp_schedule=gpipe or a larger batch")
        if pp_schedule == "dualpipev" and full < 2 * self.pp:
            raise ConfigError(f"parallel.pp_schedule=dualpipev needs at least 2 x parallel.pp = {2 * self.pp} "
                              f"micro-batches per step, but train.global_batch_size={global_batch_size} with "
                              f"train.micro_batch_size={micro_batch_size} x data-parallel degree {self.dp} gives "
                              f"{full}; use parallel.pp_schedule=zbv or a larger batch")
        if self.virtual_stages > 1 and pp_schedule in ("1f1b", "interleaved-zb"):   # the looped placements
            for size in sorted({global_batch_size, *ramp_batch_sizes}):
                n = size // unit
                rounds = max(1, n // self.pp)
                if n % rounds:
                    raise ConfigError(
                        f"parallel.pp_virtual={self.virtual_stages}: a batch of {size} gives {n} "
                        f"micro-batches, which the interleaved schedules cannot run with parallel.pp={self.pp} "
                        f"(they need a multiple of max(1, {n} // {self.pp}) = {rounds}); change "
                        f"train.global_batch_size, train.micro_batch_size or the ramp-up")

    # ---- rank layout (pure arithmetic, no processes) ------------------------------------
    def _rank(self, s: int, d: int, c: int, t: int) -> int:
        return ((s * self.dp + d) * self.cp + c) * self.tp + t

    def tp_groups(self) -> list[list[int]]:
        """Ranks of each tensor-parallel group (consecutive ranks)."""
        return [[self._rank(s, d, c, t) for t in range(self.tp)]
                for s in range(self.pp) for d in range(self.dp) for c in range(self.cp)]

    def cp_groups(self) -> list[list[int]]:
        """Ranks of each context-parallel group (stride ``tp``)."""
        return [[self._rank(s, d, c, t) for c in range(self.cp)]
                for s in range(self.pp) for d in range(self.dp) for t in range(self.tp)]

    def dp_groups(self) -> list[list[int]]:
        """Ranks of each data-parallel group (stride ``cp * tp``)."""
        return [[self._rank(s, d, c, t) for d in range(self.dp)]
                for s in range(self.pp) for c in range(self.cp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        """Ranks of each pipeline group (stride ``dp * cp * tp``), stage order."""
        n = self.dp * self.cp * self.tp
        return [[s * n + r for s in range(self.pp)] for r in range(n)]

    def coordinates(self, rank: int) -> tuple[int, int]:
        """``(dp_rank, tp_rank)`` of a global rank (``cp_coordinate`` gives its cp rank)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size}")
        d, rest = divmod(rank % (self.dp * self.cp * self.tp), self.cp * self.tp)
        return d, rest % self.tp

    def cp_coordinate(self, rank: int) -> int:
        """The context-parallel rank of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size}")
        return (rank // self.tp) % self.cp

    def stage_layers(self, pp_rank: int) -> range:
        """Indices of the transformer layers pipeline stage ``pp_rank`` owns (without
        virtual stages)."""
        n = self.num_layers // self.pp
        return range(pp_rank * n, (pp_rank + 1) * n)

    def stage_indices(self, pp_rank: int) -> list[int]:
        """The virtual stages (model chunks) of pipeline rank ``pp_rank``: ``pp_rank``,
        ``pp_rank + pp``, ... (``pp * virtual_stages`` chunks in all, in layer order)."""
        return [pp_rank + k * self.pp for k in range(self.virtual_stages)]

    def chunk_layers(self, stage_index: int) -> range:
        """Indices of the layers of model chunk ``stage_index`` (of ``pp * virtual_stages``)."""
        n = self.num_layers // (self.pp * self.virtual_stages)
        return range(stage_index * n, (stage_index + 1) * n)

    # ---- device mesh --------------------------------------------------------------------
    def build_mesh(self, device_type: str):
        """The ``(pp, dp, tp)`` DeviceMesh, every dimension present (size 1 where unused), so
        no caller branches on the layout; ``mesh["dp", "tp"]`` is this rank's stage's 2-D
        mesh. With ``cp > 1`` the mesh is ``(pp, dp, cp, tp)``; ``mesh["cp"]`` is the
        context-parallel group and ``mtnlg.parallel.cp.dp_cp_mesh(mesh)`` the one gradients
        are averaged over. The default process group must be initialised."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call "
                               "dist.init_process_group first (torchrun sets the environment)")
        if dist.get_world_size() != self.world_size:
            raise ConfigError(f"the process group has {dist.get_world_size()} ranks, but the "
                              f"parallel layout was built for {self.world_size}")
        if self.cp > 1:
            return init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp),
                                    mesh_dim_names=("pp", "dp", "cp", "tp"))
        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))

    @staticmethod
    def dp_rank(mesh) -> int:
        return mesh.get_local_rank("dp")

    @staticmethod
    def tp_rank(mesh) -> int:
        return mesh.get_local_rank("tp")

    @staticmethod
    def pp_rank(mesh) -> int:
        return mesh.get_local_rank("pp")

    @staticmethod
    def cp_rank(mesh) -> int:
        """The rank in the context-parallel group (0 on a mesh without a ``"cp"`` dimension)."""
        return mesh.get_local_rank("cp") if "cp" in (mesh.mesh_dim_names or ()) else 0

    def as_dict(self) -> dict:
        """The layout as plain data (checkpoints, summaries)."""
        out = {"tp": self.tp, "dp": self.dp, "pp": self.pp, "sequence_parallel": self.sequence_parallel,
               "fsdp": self.fsdp}
        if self.virtual_stages > 1:
            out["pp_virtual"] = self.virtual_stages
        if self.cp > 1:
            out["cp"] = self.cp
        return out

    def describe(self) -> str:
        return (f"world {self.world_size} = dp {self.dp} x {f'cp {self.cp} x ' if self.cp > 1 else ''}"
                f"tp {self.tp} x pp {self.pp}"
                f"{', sequence parallel' if self.sequence_parallel else ''}"
                f"{', FSDP' if self.fsdp else (', DDP' if self.dp * self.cp > 1 else '')}"
                f"{f', {self.num_layers // self.pp} layers per stage' if self.pp > 1 else ''}"
                f"{f' in {self.virtual_stages} virtual stages' if self.virtual_stages > 1 else ''}")
