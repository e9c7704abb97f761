"""Run the pipeline's steps that name one image, inside that image's environment.

Started by ``images/check.py`` with the image environment's own Python (never the
checkout's venv)::

    ENV/bin/python images/check_steps.py --image train --work DIR --state DIR/artifacts.json \
        --components extract,tokenize --settings DIR/settings.json

Each step is the installed package's kfp component (``mtnlg.components.<module>``), run by
kfp's own executor through ``kfp.local`` (the command a compiled pipeline gives the step's
container: ``python3 -m kfp.dsl.executor_main ...`` with the component's source), on tiny
real inputs. Steps that need an artifact another image made read it through
``dsl.importer`` from ``artifacts.json``, where every output is recorded for the next image.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One component's tiny real run: its artifact inputs (parameter -> artifact name),
    its parameters (given the settings), and its outputs (output -> artifact name)."""

    inputs: dict[str, str]
    params: typing.Callable[[dict], dict]
    outputs: dict[str, str] = field(default_factory=dict)
    # what the step's Metrics artifact must show: key -> a predicate of its value
    expect: dict[str, typing.Callable[[float], bool]] = field(default_factory=dict)
    # artifact -> text its file must contain
    contains: dict[str, str] = field(default_factory=dict)


def _positive(v: float) -> bool:
    return v > 0


_SIZES = {"model_preset": "", "num_layers": 0, "hidden_size": 0, "num_heads": 0, "seq_length": 0, "pp": 0,
          "global_batch_size": 0}

# component module -> its case. A component without a case fails the check (check.py).
CASES: dict[str, Case] = {
    "extract": Case(
        inputs={},
        params=lambda s: {"inputs": [s["corpus"]], "workers": 2, "beam_args": [],
                          "overrides": ["validation_fraction=0.3", 'filters.languages=["en"]',
                                        f"quality.classifier={s['quality_classifier']}"]},
        outputs={"dataset": "extracted", "metrics": "extract_metrics"},
        expect={"read": _positive, "kept": _positive, "splits.validation.docs": _positive,
                "dropped.quality_classifier": lambda v: v >= 0}),
    "tokenize": Case(
        inputs={"extracted": "extracted"},
        params=lambda s: {"vocab_size": 384, "overrides": []},
        outputs={"tokens": "tokens", "tokenizer": "tokenizer", "metrics": "tokenize_metrics"},
        expect={"tokens": _positive, "vocab_size": lambda v: v == 384}),
    "train": Case(
        inputs={"tokens": "tokens"},
        params=lambda s: {"recipe": "debug", **_SIZES, "tp": 2, "steps": 3,
                          "overrides": ["train.eval_iters=1", "train.log_every=1", "checkpoint.every=3"], "nproc": 2,
                          "train_config": ""},
        outputs={"checkpoint": "checkpoint", "metrics": "train_metrics"},
        expect={"steps": lambda v: v == 3, "layout.tp": lambda v: v == 2}),
    "train_job": Case(
        inputs={"tokens": "tokens"},
        params=lambda s: {"recipe": "debug", **_SIZES, "tp": 2, "steps": 2, "overrides": ["train.eval_iters=0"],
                          "train_config": "optim:\n  lr: 0.001\n",
                          "backend": "trainjob", "nodes": 2, "gpus_per_node": 0, "job_overrides": [],
                          "run_id": "image-check", "timeout_s": 600, "cleanup": "never",
                          "volume_claim": "mtnlg-shared", "volume_mount": s["volume_mount"],
                          "queue_name": "team-a", "priority_class": ""},
        outputs={"checkpoint": "job_checkpoint", "metrics": "train_job_metrics"},
        expect={"steps": lambda v: v == 2, "world_size": lambda v: v == 2}),
    "fuse": Case(
        inputs={"checkpoint": "checkpoint"},
        params=lambda s: {"overrides": []},
        outputs={"model": "model", "metrics": "fuse_metrics"},
        expect={"step": lambda v: v == 3, "hf.tensors": _positive}),
    "evaluate": Case(
        inputs={"model": "model", "tokens": "tokens", "checkpoint": "checkpoint"},
        params=lambda s: {"overrides": ["run_lm_eval=true", "max_cloze_items=20", "max_eval_tokens=2048",
                                        "max_new_tokens=4", "min_new_tokens=1", "prompts=[\"The\"]"]},
        outputs={"report": "report", "summary": "summary", "metrics": "evaluate_metrics"},
        expect={"val_perplexity": _positive, "lm_eval_cloze_items": _positive}),
    "deploy": Case(
        inputs={"model": "model", "report": "report"},
        params=lambda s: {"name": "gpt-image-check",
                          "overrides": ["storage_uri=pvc://models/gpt-image-check/hf", "max_val_perplexity=1e9",
                                        "poll_s=0.05", "timeout_s=120"],
                          "registry_overrides": [f"url={s['registry_url']}"], "run_id": "image-check"},
        outputs={"decision": "decision", "metrics": "deploy_metrics"},
        expect={"deployed": lambda v: v == 1}, contains={"decision": "**Model Registry:** gpt-image-check"}),
}


def components() -> dict[str, typing.Any]:
    """Every kfp component the installed package ships: module name -> component."""
    import pkgutil

    from kfp.dsl.python_component import PythonComponent

    import mtnlg.components as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"mtnlg.components.{info.name}")
        comps = [v for v in vars(mod).values() if isinstance(v, PythonComponent)]
        if len(comps) > 1:
            raise SystemExit(f"mtnlg.components.{info.name} defines {len(comps)} components: one per module")
        if comps:
            found[info.name] = comps[0]
    return found


def image_of(component) -> str:
    return component.component_spec.implementation.container.image


def order(names: list[str]) -> list[str]:
    """The components in an order where each one's inputs are made before it (CASES' order)."""
    return [n for n in CASES if n in names]


def run(image: str, work: Path, state_file: Path, names: list[str], settings: dict) -> int:
    import kfp.local
    from kfp import dsl

    comps = components()
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(work / f"root-{image}"),
                   raise_on_error=True)
    fields: list[tuple[str, type]] = []

    def body():
        made: dict[str, typing.Any] = {}
        for name in order(names):
            case, comp = CASES[name], comps[name]
            args = {}
            for param, art in case.inputs.items():
                if art not in made:
                    if art not in state:
                        raise SystemExit(f"{name}: needs the artifact {art!r}, which no earlier image's step made")
                    cls = getattr(dsl, state[art]["class"])
                    made[art] = dsl.importer(artifact_uri=state[art]["uri"], artifact_class=cls,
                                             reimport=False).output
                args[param] = made[art]
            task = comp(**args, **case.params(settings))
            task.set_caching_options(False)
            for out, art in case.outputs.items():
                made[art] = task.outputs[out]
        return Outputs(**{art: made[art] for art, _ in fields})

    for name in order(names):
        out_types = comps[name].component_spec.outputs or {}
        for out, art in CASES[name].outputs.items():
            fields.append((art, getattr(dsl, out_types[out].type.split("@")[0].split(".")[-1])))
    Outputs = typing.NamedTuple("Outputs", fields)
    body.__annotations__["return"] = Outputs
    pipeline = dsl.pipeline(name=f"image-check-{image}")(body)
    t = time.perf_counter()
    result = pipeline()
    print(f"image check: {image}: {', '.join(order(names))} ran in {time.perf_counter() - t:.0f} s", flush=True)
    for art, cls in fields:
        a = result.outputs[art]
        state[art] = {"uri": a.uri, "path": a.path, "class": cls.__name__, "metadata": dict(a.metadata)}
    state_file.write_text(json.dumps(state, indent=1))
    wrong = []
    for name in order(names):
        shown = state[CASES[name].outputs["metrics"]]["metadata"]
        for key, ok in CASES[name].expect.items():
            if key not in shown or not ok(shown[key]):
                wrong.append(f"{name}: metrics {key} = {shown.get(key, '(missing)')}")
        for art, text in CASES[name].contains.items():
            if text not in Path(state[art]["path"]).read_text(encoding="utf-8"):
                wrong.append(f"{name}: {art} does not say {text!r}")
    for w in wrong:
        print(f"image check: {image}: {w}", flush=True)
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--components", default="")
    p.add_argument("--settings", type=Path)
    p.add_argument("--list", action="store_true", help="print {component module: image} as JSON and exit")
    a = p.parse_args(argv)
    if a.list:
        print(json.dumps({n: image_of(c) for n, c in components().items()}))
        return 0
    settings = json.loads(a.settings.read_text()) if a.settings else {}
    return run(a.image, a.work, a.state, [n for n in a.components.split(",") if n], settings)


if __name__ == "__main__":
    sys.exit(main())
