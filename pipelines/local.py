"""``mtnlg run``: the pipeline on this machine through ``kfp.local.SubprocessRunner``.

Same DAG as on Kubeflow; each step runs as a subprocess of the current Python environment,
artifacts land under ``OUTPUT/pipeline_root/<pipeline>-<timestamp>/<task>/<output>``.
"""

from __future__ import annotations

import argparse
import json
import os
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
    inputs = [i if i.startswith("gs://") else os.path.abspath(i) for i in inputs]
    root = os.path.abspath(output)
    os.makedirs(root, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=os.path.join(root, "pipeline_root"),
               raise_on_error=True)
    # A small corpus needs a larger validation share than the 1% default to give evaluate
    # enough held-out documents; user overrides come after and win.
    status, error = "FAILED", None
    try:
        gpt_pipeline(inputs=inputs, extract_overrides=["validation_fraction=0.05", *(extract_overrides or [])],
                     extract_workers=workers, beam_args=[],
                     tokenize_overrides=["vocab_size=4096", *(tokenize_overrides or [])], recipe=recipe,
                     train_overrides=["parallel.tp=2", *(train_overrides or [])], nproc=nproc,
                     fuse_overrides=list(fuse_overrides or []), evaluate_overrides=list(evaluate_overrides or []))
        status = "SUCCEEDED"  # kfp.local raises when a task fails (raise_on_error=True)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        outputs = _collect_outputs(os.path.join(root, "pipeline_root"))
        with open(os.path.join(root, "outputs.json"), "w") as f:
            json.dump({"status": status, "error": error, "outputs": outputs}, f, indent=2)
    return outputs


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
        print(f"\nModel (safetensors + Hugging Face export): {outputs['fuse']['model']}")
        print(f"Report: {metrics_file.parent / 'report.html'}")
    return 0


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
