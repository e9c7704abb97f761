"""Layouts of a model on N GPUs: checked against the trainer's rules, estimated, ranked.

``plan(model, n_gpus, gpu, workload, Choices(...))`` walks every layout choice left free
(``None`` in :class:`Choices`): tensor-parallel degrees up to a node's GPUs, pipeline
degrees that divide the layers, virtual stages that divide a rank's layers, micro-batch
sizes 1, 2, 4, 8, the three activation-checkpointing modes, DDP or FSDP; a pinned choice
is taken as given. Context parallelism is walked only when pinned or with ``explore=True``
(it pays for long sequences). What ``mtnlg train`` does not run (a schedule it lacks, a
zero-bubble schedule with FSDP, attention without a fused kernel) the walk leaves out
unless pinned choices make it or ``explore=True``, and such a layout's estimate says what
the trainer lacks (:func:`trainer_gap`). Each layout is checked by the trainer's own rules
(``ParallelDims.build`` and ``ParallelDims.check_batches``, the checks a launch runs, on
the layout less what the trainer lacks), estimated (:func:`mtnlg.plan.estimate.estimate`),
and the ones that fit in the GPU's memory are ranked by step time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

from mtnlg.config import ConfigError
from mtnlg.model.config import ModelConfig
from mtnlg.parallel.config import ZERO_BUBBLE_SCHEDULES, ParallelConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.plan.estimate import RECOMPUTE, SCHEDULES, Estimate, Layout, Workload, estimate
from mtnlg.plan.hardware import GPU

MICRO_BATCHES = (1, 2, 4, 8)
MAX_VIRTUAL = 8
MAX_CP = 8


def trainer_schedules() -> tuple[str, ...]:
    """The pipeline schedules ``parallel.pp_schedule`` accepts."""
    return next(f for f in fields(ParallelConfig) if f.name == "pp_schedule").metadata["choices"]


@dataclass(frozen=True)
class Choices:
    """The layout choices of a plan; ``None`` leaves one free (walked)."""

    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    cp: int | None = None
    pp_virtual: int | None = None
    pp_schedule: str | None = None
    micro_batch_size: int | None = None
    activation_checkpoint: str | None = None
    flash_attention: bool | None = None
    fsdp: bool | None = None
    sequence_parallel: bool | None = None     # None: with tensor parallelism (not walked)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "cp", "pp_virtual", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.pp_schedule is not None and self.pp_schedule not in SCHEDULES:
            raise ConfigError(f"--pp-schedule {self.pp_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.activation_checkpoint is not None and self.activation_checkpoint not in RECOMPUTE:
            raise ConfigError(f"--activation-checkpoint {self.activation_checkpoint!r} is not one of "
                              f"{', '.join(RECOMPUTE)}")
        if self.pp_schedule is not None and self.pp_virtual is not None:
            # the pair alone must make sense (e.g. zbv needs 2 chunks per rank): the Layout's rules
            Layout(tp=1, pp=2, dp=1, pp_virtual=self.pp_virtual, pp_schedule=self.pp_schedule)

    def pinned_split(self) -> int:
        """The GPUs one replica of the pinned degrees takes."""
        return (self.tp or 1) * (self.cp or 1) * (self.pp or 1) * (self.dp or 1)

    def complete(self) -> bool:
        """Every choice given (``dp`` may follow from the GPU count): one layout to evaluate."""
        return all(getattr(self, f.name) is not None for f in fields(self)
                   if f.name not in ("dp", "sequence_parallel"))


@dataclass
class PlanResult:
    n_gpus: int
    gpu: str
    fitting: list[Estimate] = field(default_factory=list)      # fastest first
    too_big: list[Estimate] = field(default_factory=list)      # valid, over the GPU's memory
    invalid: Counter = field(default_factory=Counter)          # first words of the rule broken
    problems: list[str] = field(default_factory=list)          # every refusal's message, in walk order

    @property
    def best(self) -> Estimate | None:
        return self.fitting[0] if self.fitting else None


def parallel_config(lay: Layout) -> ParallelConfig:
    """The trainer's ``parallel`` section for a layout. What the trainer lacks is left out,
    so the rest can be checked: a schedule it lacks is checked as 1F1B with the same virtual
    stages, a zero-bubble schedule with FSDP as one with DDP."""
    schedule = lay.pp_schedule if lay.pp_schedule in trainer_schedules() else "1f1b"
    fsdp = lay.fsdp and lay.dp * lay.cp > 1 and schedule not in ZERO_BUBBLE_SCHEDULES
    return ParallelConfig(tp=lay.tp, pp=lay.pp, dp=lay.dp, cp=lay.cp, pp_schedule=schedule,
                          pp_virtual=lay.pp_virtual, sequence_parallel=lay.sequence_parallel and lay.tp > 1,
                          fsdp=fsdp, fsdp_grad_sync=lay.fsdp_grad_sync,
                          activation_checkpoint=lay.activation_checkpoint)


def layout_of(dims: ParallelDims, cfg: ParallelConfig, micro_batch_size: int) -> Layout:
    """The planner's view of a checked training layout."""
    return Layout(tp=dims.tp, pp=dims.pp, dp=dims.dp, cp=dims.cp, pp_virtual=dims.virtual_stages,
                  micro_batch_size=micro_batch_size, activation_checkpoint=cfg.activation_checkpoint,
                  fsdp=dims.fsdp, fsdp_grad_sync=cfg.fsdp_grad_sync, sequence_parallel=dims.sequence_parallel,
                  pp_schedule=cfg.pp_schedule)


def _gaps(lay: Layout) -> list[tuple[str, tuple[str, ...]]]:
    """What of ``lay`` ``mtnlg train`` does not run, each with the choices that make it."""
    gaps = []
    if lay.pp > 1 and lay.pp_schedule not in trainer_schedules():
        gaps.append((f"the {lay.pp_schedule} schedule", ("pp_schedule",)))
    elif lay.pp > 1 and lay.pp_schedule in ZERO_BUBBLE_SCHEDULES and lay.fsdp and lay.dp * lay.cp > 1:
        # ParallelConfig refuses the pair: FSDP2 and the split weight-gradient pass disagree
        gaps.append((f"the {lay.pp_schedule} schedule with FSDP", ("pp_schedule", "fsdp")))
    if not lay.flash_attention:
        gaps.append(("attention without a fused kernel", ("flash_attention",)))
    return gaps


def trainer_gap(lay: Layout) -> str | None:
    """What of ``lay`` ``mtnlg train`` does not run (None when it runs all of it)."""
    gaps = [text for text, _ in _gaps(lay)]
    return ", ".join(gaps) if gaps else None


def _walked(lay: Layout, choices: Choices, explore: bool) -> bool:
    """Whether the walk keeps ``lay``: without ``explore``, a layout the trainer does not
    run only when pinned choices make it so."""
    return explore or all(getattr(choices, name) is not None for _, names in _gaps(lay) for name in names)


def layout_problem(m: ModelConfig, lay: Layout, global_batch_size: int,
                   ramp_batch_sizes: tuple[int, ...] = ()) -> str | None:
    """Why ``lay`` cannot run (the trainer's own message), or None."""
    cfg = parallel_config(lay)
    try:
        dims = ParallelDims.build(cfg, cfg.dp * cfg.cp * cfg.tp * cfg.pp, m)
        dims.check_batches(cfg.pp_schedule, lay.micro_batch_size, global_batch_size, ramp_batch_sizes)
    except ConfigError as e:
        return str(e)
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pick(pinned, walked):
    return [pinned] if pinned is not None else list(walked)


def candidates(m: ModelConfig, n_gpus: int, gpu: GPU, global_batch_size: int, choices: Choices = Choices(),
               explore: bool = False):
    """Layouts to consider (not yet validated)."""
    c = choices
    cps = _pick(c.cp, [k for k in _divisors(MAX_CP) if n_gpus % k == 0] if explore else [1])
    flashes = _pick(c.flash_attention, (True, False) if explore else (True,))
    all_schedules = SCHEDULES if explore else trainer_schedules()
    for cp in cps:
        if n_gpus % cp:
            continue
        rest = n_gpus // cp
        tps = _pick(c.tp, [t for t in _divisors(gpu.gpus_per_node) if rest % t == 0])
        for t in tps:
            if rest % t:
                continue
            pps = _pick(c.pp, [p for p in _divisors(m.num_layers) if (rest // t) % p == 0])
            for p in pps:
                if rest % (t * p):
                    continue
                d = rest // (t * p)
                if c.dp is not None and c.dp != d:
                    continue
                per_rank = m.num_layers // p if m.num_layers % p == 0 else 0
                vs = _pick(c.pp_virtual, [1] if p == 1 or not per_rank
                           else [v for v in _divisors(per_rank) if v <= MAX_VIRTUAL])
                for v in vs:
                    for b in _pick(c.micro_batch_size, MICRO_BATCHES):
                        if global_batch_size % (b * d):
                            continue
                        n_micro = global_batch_size // (b * d)
                        if c.pp_schedule is not None:
                            schedules = [c.pp_schedule]
                        elif p == 1:
                            schedules = ["1f1b"]
                        else:
                            schedules = list(all_schedules)
                            if v == 1 and "gpipe" in schedules:   # 1F1B runs the same in less memory,
                                # when there are micro-batches enough to fill the pipeline
                                schedules.remove("1f1b" if n_micro < p else "gpipe")
                        step = [(True, "step")] if p == 1 and n_micro > 1 else []
                        if c.fsdp is True:
                            dp_modes = [(True, "micro_batch"), *step]
                        elif c.fsdp is False or d * cp == 1:
                            dp_modes = [(False, "micro_batch")]
                        else:
                            dp_modes = [(False, "micro_batch"), (True, "micro_batch"), *step]
                        sp = t > 1 and c.sequence_parallel is not False
                        for schedule in schedules:
                            for ac in _pick(c.activation_checkpoint, RECOMPUTE):
                                for flash in flashes:
                                    for fsdp, sync in dp_modes:
                                        lay = _layout(tp=t, pp=p, dp=d, cp=cp, pp_virtual=v, micro_batch_size=b,
                                                      activation_checkpoint=ac, flash_attention=flash, fsdp=fsdp,
                                                      fsdp_grad_sync=sync, sequence_parallel=sp,
                                                      pp_schedule=schedule)
                                        if lay is not None and _walked(lay, c, explore):
                                            yield lay


def _layout(**kw) -> Layout | None:
    """The layout, or None when its choices contradict each other (zbv without two virtual
    stages, GPipe with virtual stages): not a layout at all, so not counted as refused."""
    try:
        return Layout(**kw)
    except ConfigError:
        return None


def plan(m: ModelConfig, n_gpus: int, gpu: GPU, w: Workload, choices: Choices = Choices(),
         ramp_batch_sizes: tuple[int, ...] = (), explore: bool = False) -> PlanResult:
    if n_gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {n_gpus}")
    m.validate()
    if n_gpus % choices.pinned_split():
        raise ConfigError(f"{n_gpus} GPUs are not divisible by the given degrees tp x cp x pp x dp = "
                          f"{choices.pinned_split()}")
    out = PlanResult(n_gpus=n_gpus, gpu=gpu.name)
    for lay in candidates(m, n_gpus, gpu, w.global_batch_size, choices, explore):
        problem = layout_problem(m, lay, w.global_batch_size, ramp_batch_sizes)
        if problem:
            out.invalid[problem.split(" (")[0][:90]] += 1
            out.problems.append(problem)
            continue
        e = estimate(m, lay, w, gpu)
        (out.fitting if e.fits else out.too_big).append(e)
    out.fitting.sort(key=lambda e: (e.time.total, e.memory.total))
    out.too_big.sort(key=lambda e: e.memory.total)
    return out
