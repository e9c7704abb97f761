"""``TrainRunConfig``: one typed description of a training run, built from a named recipe.

A run is ``recipe YAML (mtnlg/recipes/NAME.yaml) <- --config FILE <- key=value overrides``,
loaded by the one config loader; the model section starts from ``model_preset`` (a name in
``mtnlg.model.presets``) when one is given. Everything is type- and range-checked when
loaded, and the layout rules that need the world size (global batch divisible by micro
batch x data-parallel degree, heads divisible by the tensor-parallel degree, ...) are
checked by :meth:`check_layout` before any process starts::

    cfg = load_config(TrainRunConfig, None, ["data.path=runs/tok", "output=runs/train", "parallel.tp=2"],
                      base=recipe("debug"))
    dims = cfg.check_layout(world_size=2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mtnlg.config import Config, ConfigError, merge, read_yaml, to_dict
from mtnlg.model.config import ModelConfig
from mtnlg.parallel.config import ParallelConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class BlendSource(Config):
    """One weighted training stream (Megatron's ``--data-path W1 PREFIX1 W2 PREFIX2``)."""

    # Dataset prefix (path without .bin/.idx): gs://, s3:// or absolute, or relative to data.path
    # (e.g. "train", "web/train").
    prefix: str = ""
    weight: float = field(default=1.0, metadata={"gt": 0.0})


@dataclass
class DataConfig(Config):
    # Tokenized directory from `mtnlg tokenize` (tokenizer.json, train.bin/.idx, ...),
    # local, gs:// or s3://.
    path: str = ""
    train_prefix: str = "train"
    valid_prefix: str = "validation"
    # Seed of the document shuffle in GPTDataset (fixed for a run: part of its identity).
    seed: int = 1234
    # Optional weighted mix of training prefixes; empty = data.path/train_prefix alone.
    blend: list[BlendSource] = field(default_factory=list)


@dataclass
class OptimConfig(Config):
    lr: float = field(default=3e-4, metadata={"gt": 0.0})
    min_lr: float = field(default=3e-5, metadata={"min": 0.0})
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = field(default=1e-8, metadata={"gt": 0.0})
    weight_decay: float = field(default=0.1, metadata={"min": 0.0})
    # Max global gradient norm; 0 disables clipping (the norm is still logged).
    grad_clip: float = field(default=1.0, metadata={"min": 0.0})

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {list(self.betas)}")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is larger than optim.lr={self.lr}")


@dataclass
class ScheduleConfig(Config):
    warmup_steps: int = field(default=0, metadata={"min": 0})
    decay: str = field(default="cosine", metadata={"choices": ("cosine", "linear", "constant")})
    # Step at which the LR reaches optim.min_lr; None = train.steps.
    decay_steps: int | None = field(default=None, metadata={"min": 1})


@dataclass
class RampupConfig(Config):
    """MT-NLG's batch-size ramp-up: START, then +INCREMENT, reaching the full global batch
    after SAMPLES consumed samples. ``start=0`` disables it."""

    start: int = field(default=0, metadata={"min": 0})
    increment: int = field(default=0, metadata={"min": 0})
    samples: int = field(default=0, metadata={"min": 0})


@dataclass
class TrainConfig(Config):
    steps: int = field(default=100, metadata={"min": 1})
    global_batch_size: int = field(default=8, metadata={"min": 1})
    micro_batch_size: int = field(default=1, metadata={"min": 1})
    rampup: RampupConfig = field(default_factory=RampupConfig)
    # auto = bf16 on GPUs that support it (else fp16), fp32 on CPU. fp8 = bf16 with the blocks'
    # linear layers in float8 (torchao, mtnlg.parallel.float8): GPUs of compute capability
    # 8.9+ (Ada, Hopper), parallel.tp=1, the torchao package (the fp8 extra).
    dtype: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16", "fp16", "fp8")})
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    log_every: int = field(default=10, metadata={"min": 1})
    # Validation every N steps (0 = only at the end) over eval_iters global batches (0 = never).
    eval_every: int = field(default=0, metadata={"min": 0})
    eval_iters: int = field(default=4, metadata={"min": 0})
    # Abort after this many non-finite losses in a row (such steps are skipped; the count is
    # read on logging, validation and checkpoint steps, so the abort comes at the next one).
    max_nan_steps: int = field(default=5, metadata={"min": 1})
    seed: int = 1234
    # Run Python's garbage collector (generation 1) every N steps instead of automatically
    # (0 = automatic): a collection in the middle of a step stalls every rank waiting on it.
    gc_every: int = field(default=50, metadata={"min": 0})
    # Read the next step's batch in a background thread (into pinned memory on GPUs).
    prefetch: bool = True
    # Seconds a collective may wait for the slowest rank before the job fails (NCCL/gloo
    # timeout; PyTorch's default is 600).
    collective_timeout_s: float = field(default=1800.0, metadata={"gt": 0.0})


@dataclass
class CheckpointConfig(Config):
    # Save every N steps (0 = only at the end of the run; one is always saved at the end).
    every: int = field(default=0, metadata={"min": 0})
    # Keep only the newest K checkpoints (0 = keep all).
    keep_last: int = field(default=2, metadata={"min": 0})
    # Write the periodic checkpoints in the background (DCP async_save: the state is copied
    # to host memory, then written while training goes on); one becomes `latest` at the next
    # logging step, save or the end of the run. The last checkpoint is written synchronously.
    async_save: bool = False
    # "auto" = resume from output/checkpoints/latest if there is one; "none" = start fresh;
    # else a checkpoint path, a checkpoints dir with `latest`, or a run dir.
    load: str = "auto"


@dataclass
class TrainRunConfig(Config):
    # Name in mtnlg.model.presets that the model section starts from ("" = fields alone).
    model_preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Run directory (local, gs:// or s3://): config.yaml, log.jsonl, tensorboard/, checkpoints/.
    output: str = ""

    @staticmethod
    def expand(data: dict) -> dict:
        """Start the ``model`` section from ``model_preset`` when one is named (the loader's
        hook; the fields given in ``model`` win, so expanding a full config changes nothing)."""
        name = data.get("model_preset")
        if not name:
            return data
        from mtnlg.model.presets import PRESETS, get_preset

        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"model_preset: unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"model: expected a mapping, got {model!r}")
        return dict(data, model=merge(to_dict(get_preset(name)), model))

    @property
    def decay_steps(self) -> int:
        """schedule.decay_steps, or the run's length (a run shorter than the warm-up only warms up)."""
        if self.schedule.decay_steps is not None:
            return self.schedule.decay_steps
        return max(self.train.steps, self.schedule.warmup_steps + 1)

    def validate(self) -> None:
        """Rules that do not depend on the world size."""
        t, s = self.train, self.schedule
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                              f"train.micro_batch_size={t.micro_batch_size}")
        if s.decay != "constant" and self.decay_steps <= s.warmup_steps:
            raise ConfigError(f"schedule.decay_steps={self.decay_steps} must exceed "
                              f"schedule.warmup_steps={s.warmup_steps} for {s.decay} decay")
        r = t.rampup
        if r.start:
            if r.start > t.global_batch_size:
                raise ConfigError(f"train.rampup.start={r.start} exceeds train.global_batch_size="
                                  f"{t.global_batch_size}")
            if r.increment < 1 or (t.global_batch_size - r.start) % r.increment:
                raise ConfigError(f"train.global_batch_size={t.global_batch_size} - train.rampup.start={r.start} "
                                  f"must be a multiple of train.rampup.increment={r.increment} (>= 1)")
            if r.samples < 1:
                raise ConfigError(f"train.rampup.samples must be >= 1 when train.rampup.start is set, got {r.samples}")
        if t.dtype == "fp8":
            self._check_fp8()
        for b in self.data.blend:
            if not b.prefix:
                raise ConfigError("data.blend: every entry needs a prefix")
        if self.parallel.dp is not None and self.parallel.dp > 0:
            self._check_batch_divisibility(self.parallel.dp)

    def _check_fp8(self) -> None:
        """What ``train.dtype=fp8`` needs of the config; the GPU itself is checked where
        the run starts (``mtnlg.train.device.check_dtype_supported``)."""
        if self.train.device == "cpu":
            raise ConfigError("train.dtype=fp8 with train.device=cpu: float8 training needs a CUDA GPU of compute "
                              "capability 8.9 or newer (Ada, Hopper); use train.dtype=fp32 or bf16 on the CPU")
        if self.parallel.tp > 1:
            raise ConfigError(f"train.dtype=fp8 with parallel.tp={self.parallel.tp}: float8 under tensor "
                              f"parallelism (torchao's Float8ColwiseParallel/Float8RowwiseParallel) is not "
                              f"supported yet; use parallel.tp=1 with data or pipeline parallelism, or "
                              f"train.dtype=bf16")

    def _check_batch_divisibility(self, dp: int) -> None:
        t = self.train
        unit = t.micro_batch_size * dp
        if t.global_batch_size % unit:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                              f"train.micro_batch_size={t.micro_batch_size} x data-parallel degree {dp} = {unit}")
        if t.rampup.start and t.rampup.start < unit:
            raise ConfigError(f"train.rampup.start={t.rampup.start} is smaller than one micro-batch per "
                              f"data-parallel rank: train.micro_batch_size={t.micro_batch_size} x "
                              f"data-parallel degree {dp} = {unit}")

    def ramp_batch_sizes(self) -> tuple[int, ...]:
        """The global batch sizes of the ramp-up before rounding (empty without one)."""
        r, full = self.train.rampup, self.train.global_batch_size
        if not r.start or r.start >= full:
            return ()
        return tuple(range(r.start, full, r.increment))

    def check_layout(self, world_size: int, paths: bool = True):
        """Everything that needs the world size; returns the ``ParallelDims``. Raises
        ``ConfigError`` naming the numbers, before any process group exists. ``paths=False``
        leaves out the data and output locations (a layout check for a recipe alone)."""
        from mtnlg.parallel.dims import ParallelDims

        if paths and not self.output:
            raise ConfigError("output: the run directory is required (output=DIR, gs://... or s3://...)")
        if paths and not self.data.path:
            raise ConfigError("data.path: the tokenized data directory is required (data.path=DIR)")
        dims = ParallelDims.build(self.parallel, world_size, self.model)
        t = self.train
        dims.check_batches(self.parallel.pp_schedule, t.micro_batch_size, t.global_batch_size, self.ramp_batch_sizes())
        return dims


def plan_estimate(cfg: TrainRunConfig, dims, gpu):
    """The planner's estimate for this run's own layout on ``gpu`` (a ``plan.hardware.GPU``)."""
    from mtnlg.plan.estimate import Workload, estimate
    from mtnlg.plan.search import layout_of

    layout = layout_of(dims, cfg.parallel, cfg.train.micro_batch_size)
    return estimate(cfg.model, layout, Workload(cfg.train.global_batch_size, cfg.model.seq_length), gpu)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(recipe_names())}")
    return path


def recipe(name: str | None) -> dict:
    """The named recipe as data, the ``base`` of a ``load_config(TrainRunConfig, ...)``
    ({} for None)."""
    return read_yaml(recipe_path(name)) if name else {}


def run_settings(model_preset: str = "", num_layers: int = 0, hidden_size: int = 0, num_heads: int = 0,
                 seq_length: int = 0, tp: int = 0, pp: int = 0, steps: int = 0,
                 global_batch_size: int = 0) -> dict:
    """The run settings a pipeline exposes as named parameters, as config data to merge over
    a recipe; 0 or "" leaves the recipe's value (the ``*_overrides`` lists still come last)::

        load_config(TrainRunConfig, overrides=overrides,
                    base=merge(recipe("mtnlg-1.3b"), run_settings(tp=8, steps=1000)))
    """
    out: dict = {}
    if model_preset:
        out["model_preset"] = model_preset
    model = {k: v for k, v in (("num_layers", num_layers), ("hidden_size", hidden_size), ("num_heads", num_heads),
                               ("seq_length", seq_length)) if v}
    parallel = {k: v for k, v in (("tp", tp), ("pp", pp)) if v}
    train = {k: v for k, v in (("steps", steps), ("global_batch_size", global_batch_size)) if v}
    for key, section in (("model", model), ("parallel", parallel), ("train", train)):
        if section:
            out[key] = section
    return out


def pipeline_run_config(recipe_name: str, overrides: list[str], train_config: str = "", **named) -> TrainRunConfig:
    """The train components' run config: the recipe, then ``train_config`` (a run config's
    YAML text, as ``mtnlg submit --run`` sends it from the repository, so a changed config
    reaches the run without a new image), the named pipeline settings over them
    (:func:`run_settings`), then the ``key=value`` overrides; checked as any load is."""
    from mtnlg.config import load_config, yaml_mapping

    base = merge(recipe(recipe_name), yaml_mapping(train_config, "train_config"))
    return load_config(TrainRunConfig, overrides=overrides, base=merge(base, run_settings(**named)))
