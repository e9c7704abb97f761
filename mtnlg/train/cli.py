"""``mtnlg train``: launch a training run locally, or be one process of a running job.

    mtnlg train --nproc 2 --recipe debug data.path=runs/tok output=runs/train parallel.tp=2

With ``--nproc N`` this command starts ``torchrun`` with N processes itself and prints the
run's summary. Without it, it is the per-process entry point that ``torchrun`` or a
Kubeflow PyTorchJob pod runs: it reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT from the environment and trains its share. Either way the whole configuration
is checked (keys, types, ranges, parallel layout against the world size) before any
process or process group starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mtnlg.config import ConfigError, load_config, merge, yaml_mapping
from mtnlg.train.config import TrainRunConfig, recipe, recipe_names


def _yaml_from_env(name: str) -> dict:
    text = os.environ.get(name)
    if not text:
        raise ConfigError(f"--config-from-env {name}: the environment variable is not set or empty")
    return yaml_mapping(text, f"--config-from-env {name}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=None,
                        help="start torchrun with this many local processes (omit inside torchrun/PyTorchJob)")
    parser.add_argument("--recipe", default=None,
                        help=f"named run recipe: {', '.join(recipe_names())}")
    parser.add_argument("--config", default=None, help="YAML file applied over the recipe (local or gs://)")
    parser.add_argument("--config-from-env", default=None, metavar="VAR",
                        help="the run config as YAML in this environment variable (what cluster jobs pass)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration and exit")
    parser.add_argument("--check", action="store_true",
                        help="validate the run for --world-size processes, print the planner's estimate "
                             "for its layout, and exit (nothing is launched; data.path and output may be unset)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --check: the number of training processes (GPUs) to validate for")
    parser.add_argument("--gpu", default="h100", metavar="KIND",
                        help="with --check: the GPU kind of the estimate (a100-80g, h100, h200; default h100)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides such as train.steps=20 parallel.tp=2 output=runs/x")


def main(args: argparse.Namespace) -> int:
    from mtnlg.config import dump_yaml

    base = recipe(args.recipe)
    if args.config_from_env:
        base = merge(base, _yaml_from_env(args.config_from_env))
    cfg = load_config(TrainRunConfig, args.config, list(args.overrides) + list(args.passthrough or []), base=base)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if args.check:
        return check(cfg, args.world_size if args.world_size is not None else args.nproc, args.gpu)
    if args.world_size is not None:
        raise ConfigError("--world-size is for --check (a launch takes its size from --nproc or torchrun)")
    if args.nproc is not None:
        from mtnlg.train.launch import LaunchError, LocalTorchrunLauncher

        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        cfg.check_layout(args.nproc)
        try:
            summary = LocalTorchrunLauncher(args.nproc).launch(cfg)
        except LaunchError as e:
            print(f"mtnlg train: {e}", file=sys.stderr)
            return 3
        print(json.dumps(summary, indent=2))
        return 0

    from mtnlg.train.trainer import TrainingDiverged, train

    if "LOCAL_RANK" not in os.environ and "RANK" not in os.environ:
        # one process of its own, not started by torchrun: say how to get more
        try:
            cfg.check_layout(1)
        except ConfigError as e:
            need = cfg.parallel.tp * cfg.parallel.pp
            raise ConfigError(f"{e} (this is one process: --nproc N starts N training processes, "
                              f"e.g. --nproc {need}, or launch it with torchrun)") from None
    try:
        train(cfg)
    except TrainingDiverged as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mtnlg train: training diverged: {e}", file=sys.stderr)
        return 3
    return 0


def check(cfg: TrainRunConfig, world_size: int | None, gpu_kind: str) -> int:
    """``mtnlg train --check``: the layout rules for ``world_size`` processes and the planner's
    estimate of that layout; 0 when it is valid and fits in the GPU's memory, 2 otherwise."""
    from mtnlg.plan.cli import describe_memory
    from mtnlg.plan.hardware import GB, get_gpu
    from mtnlg.train.config import plan_estimate
    from mtnlg.train.schedule import BatchRampup

    if not world_size or world_size < 1:
        raise ConfigError("--check needs --world-size N (the number of training processes), N >= 1")
    gpu = get_gpu(gpu_kind)
    dims = cfg.check_layout(world_size, paths=False)
    t = cfg.train
    print(f"valid for {world_size} processes: {dims.describe()}")
    unit = t.micro_batch_size * dims.dp
    print(f"global batch {t.global_batch_size} = {t.global_batch_size // unit} micro-batches of "
          f"{t.micro_batch_size} per data-parallel rank")
    if cfg.ramp_batch_sizes():
        ramp = BatchRampup(t.global_batch_size, t.rampup.start, t.rampup.increment, t.rampup.samples, unit=unit)
        first = ramp.batch_size(0)
        n = first // unit
        how = cfg.parallel.pp_schedule
        if dims.pp > 1 and n < dims.pp and how == "1f1b" and dims.virtual_stages == 1:
            how = "fill-drain: fewer micro-batches than stages"
        elif dims.pp > 1 and n < 2 * dims.pp and how == "dualpipev":
            how = "zbv: dualpipev needs 2 x parallel.pp micro-batches"
        sizes = sorted({ramp.batch_size(c) for c in range(0, t.rampup.samples, max(1, t.rampup.samples // 4096))})
        print(f"ramp-up: {t.rampup.start} -> {t.global_batch_size} over {t.rampup.samples:,} samples; trained "
              f"sizes {', '.join(map(str, sizes[:4]))}, ... (multiples of {unit}); the first step has {n} "
              f"micro-batch{'es' if n != 1 else ''} ({how})")
    e = plan_estimate(cfg, dims, gpu)
    print(f"estimate on {gpu.name}: {describe_memory(e)} per GPU ({'fits in' if e.fits else 'over'} "
          f"{gpu.memory_gb:.0f} GB); step {e.time.total:.2f} s at the full batch (bubble "
          f"{100 * e.time.bubble_fraction:.1f}%), {e.tokens_per_step / e.time.total:,.0f} tokens/s, "
          f"{e.model_tflops_per_gpu:.0f} model / {e.hardware_tflops_per_gpu:.0f} hardware TFLOP/s per GPU, "
          f"MFU {100 * e.mfu:.1f}%")
    if not e.fits:
        print(f"mtnlg train: the layout needs {e.memory.total / GB:.1f} GB per GPU, more than a "
              f"{gpu.name}'s {gpu.memory_gb:.0f} GB; see `mtnlg plan` for layouts that fit", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m mtnlg.train.cli ... (what torchrun runs in every process)
    _parser = argparse.ArgumentParser(prog="mtnlg train")
    add_arguments(_parser)
    _args = _parser.parse_args()
    _args.passthrough = []
    from mtnlg.process import exit_process

    exit_process(main(_args))  # an exception leaves through the interpreter, with its traceback
