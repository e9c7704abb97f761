"""The ``mtnlg`` command line: one subcommand per pipeline step, plus ``run`` and ``compile``.

Each subcommand lives beside the code it drives, in a module exposing
``add_arguments(parser)`` and ``main(args) -> int``; this file only dispatches. Those
modules import heavy dependencies (torch, Beam, kfp) inside ``main`` so that
``mtnlg --help`` stays fast and every subcommand is listed on every install; a step whose
dependencies are missing says so when it runs. ``run`` and ``compile`` are the kfp side
(``pipelines/``): this dispatch is the library's only door to it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from mtnlg import __version__
from mtnlg.config import ConfigError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("mtnlg.extract.cli", "clean, filter, deduplicate and split raw text (Apache Beam)"),
    "tokenize": ("mtnlg.tokenize.cli", "train a SentencePiece tokenizer and write Megatron .bin/.idx files"),
    "train": ("mtnlg.train.cli", "train a GPT with tensor/sequence/pipeline/data parallelism (torchrun / PyTorchJob)"),
    "fuse": ("mtnlg.fuse.cli", "merge a sharded checkpoint into one model (safetensors, Hugging Face)"),
    "reshard": ("mtnlg.fuse.reshard_cli", "rewrite a training checkpoint for another parallel layout"),
    "plan": ("mtnlg.plan.cli", "rank the parallel layouts of a model on N GPUs by predicted memory and step time"),
    "verify": ("mtnlg.formats.verify_cli", "check that a training checkpoint or a fused model is intact"),
    "evaluate": ("mtnlg.evaluate.cli", "perplexity, last-word accuracy and sample generations"),
    "generate": ("mtnlg.generate.cli", "generate text from a fused model"),
    "serve": ("mtnlg.serve.cli", "serve a fused model over HTTP with the OpenAI API"),
    "job": ("mtnlg.cluster.cli", "write or run the Kubeflow TrainJob / PyTorchJob of a training run"),
    "run": ("mtnlg.pipelines.local", "run the whole pipeline locally through kfp.local"),
    "compile": ("mtnlg.pipelines.compile", "compile the Kubeflow pipeline to IR YAML"),
    "submit": ("mtnlg.pipelines.submit", "upload the pipeline to Kubeflow and start a (recurring) run"),
}


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def _commands() -> dict[str, object]:
    """Every subcommand's module (a missing one is a packaging error, never skipped)."""
    return {name: importlib.import_module(mod) for name, (mod, _) in COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtnlg", description=__doc__.splitlines()[0],
                                     epilog="Errors are one line; --debug (anywhere before a bare --) or "
                                            "MTNLG_DEBUG=1 shows the traceback.")
    parser.add_argument("--version", action="version", version=f"mtnlg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _commands().items():
        p = sub.add_parser(name, help=COMMANDS[name][1], description=COMMANDS[name][1])
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line's words as the command will see them (``args.passthrough``: the
    words after a bare ``--``; ``args.debug``); unknown words are argparse's error (exit 2)."""
    parser = parser or build_parser()
    # Everything after a bare "--" is passed through untouched (e.g. Beam pipeline options).
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    debug = "--debug" in argv or os.environ.get("MTNLG_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    # argparse takes a run of positionals only once, so ``--nproc 2 a=1 --recipe x b=2``
    # would reject ``b=2``; such stray ``key=value`` words join the command's overrides.
    args, extras = parser.parse_known_args(argv)
    stray = [a for a in extras if _OVERRIDE.match(a)]
    if stray and isinstance(getattr(args, "overrides", None), list):
        args.overrides = [*args.overrides, *stray]
        extras = [a for a in extras if a not in stray]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    args.passthrough, args.debug = passthrough, debug
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(list(sys.argv[1:] if argv is None else argv), parser)
    debug = args.debug
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return int(args._main(args) or 0)
    except ConfigError as e:
        if debug:
            raise
        print(f"mtnlg {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mtnlg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure is one line; --debug shows where
        if debug:
            raise
        print(f"mtnlg {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(e: BaseException) -> str:
    """An exception as one line: the message of the errors users cause or meet (files,
    values, permissions, step failures) as it is; any other with its type, and the way to
    see its traceback."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (FileNotFoundError, PermissionError, ValueError, TimeoutError)) \
            or type(e).__name__ in ("RunFailed", "LaunchError", "JobFailed", "RemoteStorageError", "CheckpointDamaged"):
        return text
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"


def run() -> None:
    """The ``mtnlg`` command: :func:`main`'s status, without the interpreter's teardown
    (``mtnlg.process``)."""
    from mtnlg.process import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
