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

from mtnlg.config import ConfigError, load_config, merge
from mtnlg.train.config import TrainRunConfig, recipe, recipe_names


def _yaml_from_env(name: str) -> dict:
    import yaml

    text = os.environ.get(name)
    if not text:
        raise ConfigError(f"--config-from-env {name}: the environment variable is not set or empty")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config-from-env {name}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config-from-env {name}: expected a mapping, got {type(data).__name__}")
    return data


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

    try:
        train(cfg)
    except TrainingDiverged as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mtnlg train: training diverged: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":  # python -m mtnlg.train.cli ... (what torchrun runs in every process)
    _parser = argparse.ArgumentParser(prog="mtnlg train")
    add_arguments(_parser)
    _args = _parser.parse_args()
    _args.passthrough = []
    sys.exit(main(_args))
