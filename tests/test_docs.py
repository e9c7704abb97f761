"""Every command and Python block in README.md and docs/ is checked, so a doc cannot go
stale silently.

* Each ``mtnlg ...`` command line of a code block (continuations joined, comments cut) is
  parsed by the real command line, options and ``KEY=VALUE`` overrides included, and its
  configuration is built and checked the way the command builds it: ``mtnlg train`` with
  ``--print-config`` (and the layout for ``--nproc``), ``mtnlg run`` up to the point where
  the pipeline would start (every step's settings), ``mtnlg job`` in full (it only writes
  the objects, after admission), the other steps' ``KEY=VALUE`` against their config
  classes. A command shown with an error after it must fail with that error. A block whose
  first line is a synopsis (``[--option]``, ``INPUT...``) is skipped, and said so.
* Each Python block compiles, and every name it imports exists where it imports it from.

The whole pipeline as README's quick start runs it is tests/test_make_run.py; the
cluster commands are compiled or dry-run by their own tests (test_pipeline, test_submit,
test_cluster_jobs).
"""

from __future__ import annotations

import ast
import importlib
import re

import pytest

from doc_blocks import ROOT, commands, is_synopsis, snippets
from doc_blocks import split_words as _split
from mtnlg.cli import parse as cli_parse

pytestmark = pytest.mark.unit

SCHEMAS = ROOT.parent / "shared" / "schemas"


ALL_COMMANDS = [(f"{s.where.rsplit(':', 1)[0]}:{line}", cmd, shown) for s in snippets()
                for line, cmd, shown in commands(s)]
PYTHON = [s for s in snippets() if s.lang == "python"]


def test_the_docs_have_commands_and_python_to_check():
    assert len(ALL_COMMANDS) >= 40 and len(PYTHON) >= 12
    subcommands = {_split(c)[0] for _, c, _ in ALL_COMMANDS}
    assert {"extract", "tokenize", "train", "fuse", "evaluate", "generate", "serve", "run", "compile", "submit",
            "job", "plan", "reshard", "verify"} <= subcommands


def parse(words: list[str]):
    """What ``mtnlg.cli.main`` does with the words before running the command (an unknown
    word: argparse's SystemExit, turned into an assertion naming it)."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cli_parse(list(words))
    except SystemExit:
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None


# the config class each step's KEY=VALUE words are checked against
STEP_CONFIGS = {"extract": "mtnlg.extract.config:ExtractConfig", "tokenize": "mtnlg.tokenize.config:TokenizeConfig",
                "evaluate": "mtnlg.evaluate.config:EvaluateConfig"}


def check_configuration(args, tmp_path, monkeypatch, capsys) -> None:
    from mtnlg.config import load_config

    name = args.command
    if name == "train" and not args.config:
        from mtnlg.train.cli import main as train_main

        args.print_config = True
        assert train_main(args) == 0
        capsys.readouterr()
        if args.nproc:
            from mtnlg.train.config import TrainRunConfig, recipe

            cfg = load_config(TrainRunConfig, None, list(args.overrides), base=recipe(args.recipe))
            cfg.check_layout(args.nproc, paths=False)
    elif name == "run":
        import mtnlg.pipelines.gpt as gpt
        from mtnlg.pipelines.local import check_run

        monkeypatch.setattr(gpt, "gpt_pipeline", lambda **kw: None)
        overrides = {"extract": ["validation_fraction=0.05", *args.extract], "tokenize": args.tokenize,
                     "train": ["parallel.tp=2", *args.train], "fuse": args.fuse, "evaluate": args.evaluate}
        check_run(["gs://any/"], args.recipe, args.nproc, args.workers, overrides)
    elif name == "job" and not args.submit:  # writes the objects, after every check, into a file here
        args.output = str(tmp_path / "job.yaml")
        if args.schema_dir:  # the docs' crds/ folder: the operators' real CRDs
            if not SCHEMAS.is_dir():
                pytest.skip(f"no CRDs at {SCHEMAS}")
            args.schema_dir = str(SCHEMAS)
        assert args._main(args) == 0
        capsys.readouterr()
    elif name in STEP_CONFIGS and getattr(args, "overrides", None):
        module, cls = STEP_CONFIGS[name].split(":")
        load_config(getattr(importlib.import_module(module), cls), overrides=list(args.overrides))


@pytest.mark.parametrize("where, command, shown", ALL_COMMANDS, ids=[w for w, _, _ in ALL_COMMANDS])
def test_each_documented_command_parses_and_its_configuration_is_valid(where, command, shown, tmp_path,
                                                                       monkeypatch, capsys):
    """A command shown with an error after it must fail with that error's message."""
    from mtnlg.config import ConfigError

    words = _split(command)
    if is_synopsis(words):
        pytest.skip(f"{where}: a synopsis, not a command")
    error = re.search(r"^mtnlg \w+: (?:configuration )?error: (.*)$", shown, re.M)
    if error is None:
        check_configuration(parse(words), tmp_path, monkeypatch, capsys)
        return
    with pytest.raises(ConfigError) as e:
        check_configuration(parse(words), tmp_path, monkeypatch, capsys)
    assert str(e.value).startswith(error.group(1).split(" (rule:")[0].strip()), (str(e.value), error.group(1))


def _imports(tree: ast.AST) -> list[tuple[str, str | None]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
    return out


@pytest.mark.parametrize("snippet", PYTHON, ids=str)
def test_each_python_block_compiles_and_its_imports_exist(snippet):
    tree = compile(snippet.text, snippet.where, "exec", ast.PyCF_ONLY_AST)
    for module, name in _imports(tree):
        if module.split(".")[0] not in ("mtnlg", "openai", "transformers", "torch", "os", "json"):
            continue
        mod = importlib.import_module(module)
        if name and name != "*":
            assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), \
                f"{snippet.where}: {module} has no {name}"


def test_a_stale_command_would_be_caught(tmp_path, monkeypatch, capsys):
    """The checks fail on the mistakes docs have had: an option the command lacks, a key the
    config lacks, a layout the process count cannot hold."""
    with pytest.raises(AssertionError, match=r"unrecognized arguments: --threads 1"):
        parse(_split("mtnlg generate out/model --prompt x --threads 1"))
    from mtnlg.config import ConfigError

    with pytest.raises(ConfigError, match="train.setps"):
        check_configuration(parse(_split("mtnlg train --recipe debug train.setps=3")), tmp_path, monkeypatch,
                            capsys)
    with pytest.raises(ConfigError, match="world size 1 is not divisible"):
        check_configuration(parse(_split("mtnlg train --nproc 1 --recipe debug data.path=x output=y")), tmp_path,
                            monkeypatch, capsys)
    with pytest.raises(ConfigError, match="--extract: unknown key 'text_feild'"):
        check_configuration(parse(_split("mtnlg run --extract text_feild=body")), tmp_path, monkeypatch, capsys)
