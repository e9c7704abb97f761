"""``mtnlg run``: the pipeline on this machine through ``kfp.local.SubprocessRunner``.

Same DAG as on Kubeflow; each step runs as a subprocess of the current Python environment,
artifacts land under ``OUTPUT/pipeline_root/<pipeline>-<timestamp>/<task>/<output>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import deque
from pathlib import Path

# The bundled corpus lives at the repository root, beside this package's source.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "data" / "corpus" / "python-docs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="runs/local", help="pipeline root directory (default runs/local)")
    p.add_argument("--input", action="append", dest="inputs", metavar="PATH",
                   help="raw text: file, directory, glob or gs:// URI (repeatable; default: bundled corpus)")
    p.add_argument("--recipe", default="local", help="training recipe (default local: a tiny GPT, ~2 min on CPU)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--workers", type=int, default=2, help="Beam DirectRunner workers (default 2)")
    p.add_argument("--extract", action="append", default=[], metavar="KEY=VALUE", help="extract config override")
    p.add_argument("--tokenize", action="append", default=[], metavar="KEY=VALUE", help="tokenize config override")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="train config override, applied after the default parallel.tp=2")
    p.add_argument("--fuse", action="append", default=[], metavar="KEY=VALUE", help="fuse config override")
    p.add_argument("--evaluate", action="append", default=[], metavar="KEY=VALUE", help="evaluate config override")


def run_local(output: str, inputs: list[str] | None = None, recipe: str = "local", nproc: int = 2,
              workers: int = 2, extract_overrides: list[str] | None = None,
              tokenize_overrides: list[str] | None = None, train_overrides: list[str] | None = None,
              fuse_overrides: list[str] | None = None, evaluate_overrides: list[str] | None = None) -> dict:
    """Run the whole pipeline locally; returns ``{task: {output: uri}}``. OUTPUT/outputs.json
    records the run's status (SUCCEEDED, or FAILED with the error) and the outputs found."""
    from kfp import local
    from mtnlg.pipelines.gpt import gpt_pipeline

    if inputs is None:
        if not DEFAULT_CORPUS.is_dir():
            raise FileNotFoundError(f"bundled corpus not found at {DEFAULT_CORPUS}; pass --input PATH")
        inputs = [str(DEFAULT_CORPUS)]
    inputs = [i if i.startswith(("gs://", "s3://")) else os.path.abspath(i) for i in inputs]
    # A small corpus needs a larger validation share than the 1% default to give evaluate
    # enough held-out documents; user overrides come after and win.
    overrides = {"extract": ["validation_fraction=0.05", *(extract_overrides or [])],
                 "tokenize": ["vocab_size=4096", *(tokenize_overrides or [])],
                 "train": ["parallel.tp=2", *(train_overrides or [])],
                 "fuse": list(fuse_overrides or []), "evaluate": list(evaluate_overrides or [])}
    check_run(inputs, recipe, nproc, workers, overrides)
    root = os.path.abspath(output)
    os.makedirs(root, exist_ok=True)
    import warnings

    # kfp.local's notes on what it cannot do locally (display names; the steps' container
    # images, whose packages this environment has) say nothing to act on.
    warnings.filterwarnings("ignore", message=r"Task '.*': settings .* have no effect", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"You may be attemping to run a task that uses custom",
                            category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=os.path.join(root, "pipeline_root"),
               raise_on_error=True)
    status, error = "FAILED", None
    tail = _Tail()
    try:
        with tail:
            gpt_pipeline(inputs=inputs, extract_overrides=overrides["extract"], extract_workers=workers, beam_args=[],
                         tokenize_overrides=overrides["tokenize"], recipe=recipe, train_overrides=overrides["train"],
                         nproc=nproc, fuse_overrides=overrides["fuse"], evaluate_overrides=overrides["evaluate"])
        status = "SUCCEEDED"  # kfp.local raises when a task fails (raise_on_error=True)
    except Exception as e:
        error = f"{type(e).__name__}: {_plain(str(e))}"
        failed = re.search(r"Inner task failed: '([^']+)'", _plain(str(e)))
        if failed:
            cause = tail.cause()
            error = f"the {failed.group(1)} step failed: {cause or 'see its log above'}"
            raise RunFailed(f"{error} (its log is above; the run's state: {os.path.join(root, 'outputs.json')})") \
                from None
        raise
    finally:
        outputs = _collect_outputs(os.path.join(root, "pipeline_root"))
        with open(os.path.join(root, "outputs.json"), "w") as f:
            json.dump({"status": status, "error": error, "outputs": outputs}, f, indent=2)
    return outputs


class RunFailed(RuntimeError):
    """A step of the local run failed; the message is its cause, as one line."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the last line of a Python traceback, or a step's own one-line error
_CAUSE = re.compile(r"^\s*((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Diverged)(?::.*)?"
                    r"|mtnlg \w+: (?:configuration )?error: .*)$")


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


class _Tail:
    """While active, ``sys.stdout`` also keeps its last lines (kfp.local prints each step's
    output there), so a failed run can say what its failing step said last."""

    def __init__(self, lines: int = 400):
        self.lines: deque[str] = deque(maxlen=lines)
        self._out = None
        self._part = ""

    def __enter__(self):
        self._out = sys.stdout
        sys.stdout = self
        return self

    def __exit__(self, *exc):
        sys.stdout = self._out

    def write(self, s: str) -> int:
        self._out.write(s)
        self._part += s
        *done, self._part = self._part.split("\n")
        self.lines.extend(_plain(line) for line in done)
        return len(s)

    def flush(self) -> None:
        self._out.flush()

    def __getattr__(self, name):
        return getattr(self._out, name)

    def cause(self) -> str:
        """The last exception line (or ``mtnlg STEP: error: ...`` line) printed."""
        for line in reversed(self.lines):
            if _CAUSE.match(line) and not line.strip().startswith("RuntimeError: Pipeline"):
                return line.strip()
        return ""


# how `mtnlg run` calls the pipeline parameters in its messages
RUN_FLAGS = {"extract_overrides": "--extract", "tokenize_overrides": "--tokenize", "train_overrides": "--train",
             "fuse_overrides": "--fuse", "evaluate_overrides": "--evaluate", "nproc": "--nproc",
             "extract_workers": "--workers"}


def check_run(inputs: list[str], recipe: str, nproc: int, workers: int, overrides: dict[str, list[str]]) -> None:
    """Every step's configuration and the inputs, checked before anything starts
    (``pipelines/checks.py``, with the pipeline's own defaults): a mistake is one
    ``ConfigError`` (or ``FileNotFoundError``) naming the flag and the key."""
    from mtnlg.pipelines.checks import check_parameters
    from mtnlg.pipelines.gpt import parameter_defaults

    for path in inputs:
        if "://" not in path and not any(c in path for c in "*?[") and not os.path.exists(path):
            raise FileNotFoundError(f"--input {path}: no such file or directory")
    values = parameter_defaults()
    values.update(recipe=recipe, nproc=nproc, extract_workers=workers,
                  **{f"{step}_overrides": o for step, o in overrides.items()})
    check_parameters(values, RUN_FLAGS)


def _collect_outputs(pipeline_root: str) -> dict:
    """The newest run's task output folders: ``{task: {output: path}}``."""
    runs = sorted(p for p in Path(pipeline_root).iterdir() if p.is_dir())
    if not runs:
        return {}
    newest = runs[-1]
    out: dict = {}
    for task_dir in sorted(p for p in newest.iterdir() if p.is_dir()):
        out[task_dir.name] = {o.name: str(o) for o in sorted(task_dir.iterdir()) if o.name != "executor_output.json"}
    return out


def main(args: argparse.Namespace) -> int:
    outputs = run_local(args.output, args.inputs, args.recipe, args.nproc, args.workers,
                        args.extract, args.tokenize, args.train, args.fuse, args.evaluate)
    print("\nmtnlg pipeline finished. Outputs:")
    for task, outs in outputs.items():
        for name, path in outs.items():
            print(f"  {task}.{name}: {path}")
    metrics_file = Path(outputs.get("evaluate", {}).get("report.d", "")) / "metrics.json"
    if metrics_file.is_file():
        print()
        print(evaluation_summary(json.loads(metrics_file.read_text())))
        model = stable_link(outputs["fuse"]["model"], os.path.join(args.output, "model"))
        print(f"\nModel (safetensors + Hugging Face export): {model} -> {outputs['fuse']['model']}")
        print(f"Report: {metrics_file.parent / 'report.html'}")
    return 0


def stable_link(target: str, link: str) -> str:
    """``link`` (OUTPUT/model) pointing at this run's ``target``, replacing the previous
    run's link atomically, so ``mtnlg serve runs/local/model`` always serves the newest
    model. An existing file or folder of that name that is not a link is left alone."""
    if os.path.exists(link) and not os.path.islink(link):
        return target
    tmp = f"{link}.tmp-{os.getpid()}"
    os.symlink(os.path.relpath(target, os.path.dirname(os.path.abspath(link))), tmp)
    os.replace(tmp, link)
    return link


def _fig(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def evaluation_summary(m: dict) -> str:
    """What ``mtnlg run`` prints of the evaluation (README.md quotes it; the e2e test compares)."""
    lines = ["Evaluation:"]
    for key in ("parameters", "train_steps", "train_first_loss", "train_final_loss", "val_loss", "val_perplexity",
                "val_bits_per_byte", "cloze_accuracy", "cloze_items"):
        if key in m:
            ci = m.get(f"{key}_ci95")
            extra = f" (95% CI {_fig(ci[0])}-{_fig(ci[1])})" if isinstance(ci, list) and len(ci) == 2 else ""
            lines.append(f"  {key}: {_fig(m[key])}{extra}")
    samples = m.get("samples") or []
    if samples:
        lines.append(f"Samples ({m.get('samples_decoding', 'greedy')}):")
        for smp in samples:
            cont = " ".join(smp["completion"].split())
            sep = " " if smp["completion"][:1].isspace() else ""
            lines.append(f"  [{smp['prompt']}]{sep}{cont}")
    return "\n".join(lines)
