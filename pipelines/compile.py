"""``mtnlg compile [--train-backend pod|trainjob|pytorchjob] -o FILE``: the pipeline's kfp v2 IR YAML."""

from __future__ import annotations

import argparse

BACKENDS = ("pod", "trainjob", "pytorchjob")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="where to write the IR YAML (local path)")
    p.add_argument("--train-backend", default="trainjob", choices=BACKENDS,
                   help="where the train step trains: a Kubeflow Trainer TrainJob (default), a Training Operator "
                        "PyTorchJob, or torchrun in the step's own pod (one node)")


def compile_pipeline(path: str, train_backend: str = "trainjob") -> str:
    from kfp import compiler
    from mtnlg.pipelines.gpt import pipeline_for

    compiler.Compiler().compile(pipeline_for(train_backend), package_path=path)
    return path


def main(args: argparse.Namespace) -> int:
    print(compile_pipeline(args.output, args.train_backend))
    return 0
