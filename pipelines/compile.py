"""``mtnlg compile -o FILE``: write the pipeline's kfp v2 IR YAML for Kubeflow."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="where to write the IR YAML (local path)")


def compile_pipeline(path: str) -> str:
    from kfp import compiler
    from mtnlg.pipelines.gpt import gpt_pipeline

    compiler.Compiler().compile(gpt_pipeline, package_path=path)
    return path


def main(args: argparse.Namespace) -> int:
    print(compile_pipeline(args.output))
    return 0
