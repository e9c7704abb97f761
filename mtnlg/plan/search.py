"""Every layout of a model on N GPUs that the trainer accepts, estimated and ranked.

``plan(model, n_gpus, gpu, workload)`` walks tensor-parallel degrees up to a node's GPUs,
pipeline degrees that divide the layers, virtual stages that divide a rank's layers,
micro-batch sizes 1, 2, 4, 8, the three activation-checkpointing modes and DDP or FSDP;
keeps those the trainer's own rules accept (``ParallelDims.build`` and
``ParallelDims.check_batches``, the checks a launch runs), estimates each
(:func:`mtnlg.plan.estimate.estimate`) and ranks the ones that fit in the GPU's memory by
step time. Pinning ``tp`` or ``pp`` restricts the walk to them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mtnlg.config import ConfigError
from mtnlg.model.config import ModelConfig
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.plan.estimate import Estimate, Layout, Workload, estimate
from mtnlg.plan.hardware import GPU

MICRO_BATCHES = (1, 2, 4, 8)
RECOMPUTE = ("none", "selective", "full")
MAX_VIRTUAL = 8


@dataclass
class PlanResult:
    n_gpus: int
    gpu: str
    fitting: list[Estimate] = field(default_factory=list)      # fastest first
    too_big: list[Estimate] = field(default_factory=list)      # valid, over the GPU's memory
    invalid: Counter = field(default_factory=Counter)          # first words of the rule broken

    @property
    def best(self) -> Estimate | None:
        return self.fitting[0] if self.fitting else None


def parallel_config(lay: Layout) -> ParallelConfig:
    """The trainer's ``parallel`` section for a layout."""
    return ParallelConfig(tp=lay.tp, pp=lay.pp, dp=lay.dp, pp_schedule=lay.pp_schedule,
                          pp_virtual=lay.virtual_stages, sequence_parallel=lay.sequence_parallel and lay.tp > 1,
                          fsdp=lay.fsdp and lay.dp > 1, fsdp_grad_sync=lay.fsdp_grad_sync,
                          activation_checkpoint=lay.activation_checkpoint)


def layout_of(dims: ParallelDims, cfg: ParallelConfig, micro_batch_size: int) -> Layout:
    """The planner's view of a checked training layout."""
    return Layout(tp=dims.tp, pp=dims.pp, dp=dims.dp, virtual_stages=dims.virtual_stages,
                  micro_batch_size=micro_batch_size, activation_checkpoint=cfg.activation_checkpoint,
                  fsdp=dims.fsdp, fsdp_grad_sync=cfg.fsdp_grad_sync, sequence_parallel=dims.sequence_parallel,
                  pp_schedule=cfg.pp_schedule)


def layout_problem(m: ModelConfig, lay: Layout, global_batch_size: int,
                   ramp_batch_sizes: tuple[int, ...] = ()) -> str | None:
    """Why the trainer would refuse ``lay`` (its own message), or None."""
    try:
        dims = ParallelDims.build(parallel_config(lay), lay.world_size, m)
        dims.check_batches(lay.pp_schedule, lay.micro_batch_size, global_batch_size, ramp_batch_sizes)
    except ConfigError as e:
        return str(e)
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(m: ModelConfig, n_gpus: int, gpu: GPU, global_batch_size: int,
               tp: int | None = None, pp: int | None = None):
    """Layouts to consider (not yet validated)."""
    tps = [tp] if tp else [t for t in _divisors(min(gpu.gpus_per_node, n_gpus)) if n_gpus % t == 0]
    for t in tps:
        if n_gpus % t:
            continue
        pps = [pp] if pp else [p for p in _divisors(m.num_layers) if (n_gpus // t) % p == 0]
        for p in pps:
            if n_gpus % (t * p):
                continue
            d = n_gpus // (t * p)
            per_rank = m.num_layers // p if m.num_layers % p == 0 else 0
            vs = [1] if p == 1 or not per_rank else [v for v in _divisors(per_rank) if v <= MAX_VIRTUAL]
            for v in vs:
                for b in MICRO_BATCHES:
                    if global_batch_size % (b * d):
                        continue
                    n_micro = global_batch_size // (b * d)
                    schedule = "1f1b" if (p == 1 or v > 1 or n_micro >= p) else "gpipe"
                    dp_modes = [(False, "micro_batch")]
                    if d > 1:
                        dp_modes.append((True, "micro_batch"))
                        if p == 1 and n_micro > 1:
                            dp_modes.append((True, "step"))
                    for ac in RECOMPUTE:
                        for fsdp, sync in dp_modes:
                            yield Layout(tp=t, pp=p, dp=d, virtual_stages=v, micro_batch_size=b,
                                         activation_checkpoint=ac, fsdp=fsdp, fsdp_grad_sync=sync,
                                         sequence_parallel=t > 1, pp_schedule=schedule)


def plan(m: ModelConfig, n_gpus: int, gpu: GPU, w: Workload, tp: int | None = None, pp: int | None = None,
         ramp_batch_sizes: tuple[int, ...] = ()) -> PlanResult:
    if n_gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {n_gpus}")
    m.validate()
    out = PlanResult(n_gpus=n_gpus, gpu=gpu.name)
    for lay in candidates(m, n_gpus, gpu, w.global_batch_size, tp, pp):
        problem = layout_problem(m, lay, w.global_batch_size, ramp_batch_sizes)
        if problem:
            out.invalid[problem.split(" (")[0][:90]] += 1
            continue
        e = estimate(m, lay, w, gpu)
        (out.fitting if e.fits else out.too_big).append(e)
    out.fitting.sort(key=lambda e: (e.time.total, e.memory.total))
    out.too_big.sort(key=lambda e: e.memory.total)
    return out
