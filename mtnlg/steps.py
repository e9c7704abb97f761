"""One function per pipeline step: what a kfp component, the API and the CLI's ``run`` call.

Every step has the same shape::

    result = <name>_step(inputs, output, config)        # -> StepOutput

``inputs`` are the locations the step reads (paths or URIs), ``output`` where it writes,
``config`` its typed config (``ExtractConfig``, ``TokenizeConfig``, ``TrainRunConfig``,
``FuseConfig``, ``EvaluateConfig``), already checked. Options of how a step is *run*
rather than what it computes (Beam workers and runner flags, the number of training
processes) are keyword-only. The result names the output and carries the step's figures.
No kfp here: the components in ``components/`` are a few lines around these functions.

Importing this module imports no step's room: each function imports what it runs, so the
extract and tokenize steps run in the data image, which has no torch (docs/kubeflow.md,
"Images").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # each step imports its own room when it runs, so a step's image needs only that room's
    from mtnlg.evaluate.config import EvaluateConfig
    from mtnlg.extract.config import ExtractConfig
    from mtnlg.fuse.config import FuseConfig
    from mtnlg.tokenize.config import TokenizeConfig
    from mtnlg.train.config import TrainRunConfig


@dataclass(frozen=True)
class StepOutput:
    """What a step wrote (``output``) and its figures (``stats``: counts, losses, timings,
    nested as the step reports them)."""

    output: str
    stats: dict[str, Any]

    def metrics(self) -> dict[str, float]:
        """Every finite numeric leaf of ``stats`` under a dotted key (``failed.corrupt_gzip``),
        as a kfp ``Metrics`` artifact shows them."""
        return flatten(self.stats)


def flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict, with dotted keys; booleans as 0/1, non-finite dropped."""
    out: dict[str, float] = {}
    for k, v in stats.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = v
    return out


@dataclass(frozen=True)
class EvaluateInputs:
    """What the evaluate step reads: the fused model, the tokenized data (its validation
    split) and, for the loss curve, the training run's ``log.jsonl``."""

    model: str
    tokens: str
    train_log: str | None = None


def extract_step(inputs: list[str], output: str, config: ExtractConfig, *, workers: int = 2,
                 beam_args: list[str] | None = None) -> StepOutput:
    """Clean, filter, deduplicate and split raw text ``inputs`` into ``output`` (see docs/extract.md)."""
    from mtnlg.extract.beam_job import extract

    return StepOutput(output, extract(list(inputs), output, config, list(beam_args or []), workers=workers))


def tokenize_step(inputs: str, output: str, config: TokenizeConfig) -> StepOutput:
    """Train a tokenizer on the extracted ``inputs`` and write Megatron ``.bin/.idx`` files
    (see docs/tokenize.md)."""
    from mtnlg.tokenize.tokenize import tokenize

    return StepOutput(output, tokenize(inputs, output, config))


def train_step(inputs: str, output: str, config: TrainRunConfig, *, nproc: int = 2) -> StepOutput:
    """Train a GPT on the tokenized ``inputs`` into the run directory ``output`` with
    ``nproc`` local processes (see docs/train.md); ``config.data.path`` and ``config.output``
    are set from ``inputs`` and ``output``."""
    from mtnlg.train.launch import LocalTorchrunLauncher

    return _train(LocalTorchrunLauncher(nproc), inputs, output, config)


def train_job_step(inputs: str, output: str, config: TrainRunConfig, *, job, run_id: str = "",
                   task: str = "train", timeout_s: float | None = None, cleanup: str = "on-success",
                   owner: dict[str, str] | None = None) -> StepOutput:
    """Train on a Kubernetes cluster: a TrainJob or PyTorchJob (``job``, a
    ``ClusterJobConfig``) of ``job.nodes`` x ``job.gpus_per_node`` processes runs ``config``
    on the tokenized ``inputs`` into the run directory ``output``, both of which its pods
    must reach (gs://, s3:// or the shared volume). The job's name, unless ``job.name`` is
    set, comes from ``run_id`` and ``task``, so a retried step adopts the job it created;
    ``owner`` (the launcher's pod) makes the job go when the pipeline run's pods go. Returns
    the run's ``summary.json`` (see docs/kubeflow.md)."""
    from mtnlg.cluster.jobs import job_name
    from mtnlg.cluster.launcher import ClusterJobLauncher

    if not job.name:
        job = dataclasses.replace(job, name=job_name(run_id or "local", task),
                                  labels={**job.labels, "mtnlg.kubeflow.org/run": job_name(run_id or "local", "run")})
    return _train(ClusterJobLauncher(job, timeout_s=timeout_s, cleanup=cleanup, owner=owner), inputs, output, config)


def _train(launcher, inputs: str, output: str, config: TrainRunConfig) -> StepOutput:
    """``config`` trained by ``launcher`` (a ``train.launch.Launcher``: torchrun here, or a
    cluster job) on ``inputs`` into ``output``."""
    cfg = dataclasses.replace(config, data=dataclasses.replace(config.data, path=inputs), output=output)
    return StepOutput(output, launcher.train(cfg))


def fuse_step(inputs: str, output: str, config: FuseConfig) -> StepOutput:
    """Merge the latest checkpoint of the run directory ``inputs`` into one model directory
    (see docs/fuse.md)."""
    from mtnlg.fuse.fuse import fuse_checkpoint

    return StepOutput(output, fuse_checkpoint(inputs, output, dtype=config.dtype, hf=config.hf,
                                              max_shard_bytes=config.max_shard_bytes, verify=config.verify))


def evaluate_step(inputs: EvaluateInputs, output: str, config: EvaluateConfig) -> StepOutput:
    """Perplexity, last-word accuracy, samples and the report (see docs/evaluate.md)."""
    from mtnlg.evaluate.evaluate import evaluate_model

    return StepOutput(output, evaluate_model(inputs.model, inputs.tokens, output, train_log=inputs.train_log,
                                             config=config))


@dataclass(frozen=True)
class DeployInputs:
    """What the deploy step reads: the fused model directory and the evaluate step's output
    (its ``metrics.json``)."""

    model: str
    evaluation: str


def evaluation_metrics(evaluation: str) -> dict[str, Any]:
    """The evaluate step's ``metrics.json`` in the directory ``evaluation``."""
    import json

    from mtnlg import storage

    path = storage.join(evaluation, "metrics.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist: expected the evaluate step's output directory")
    return json.loads(storage.read_text(path))


def deploy_step(inputs: DeployInputs, output: str, config, *, run_id: str = "", registry=None,
                lineage: dict[str, str] | None = None, custom: Any = None) -> StepOutput:
    """Serve the fused model on KServe when its evaluation passes the gate, and optionally
    register it in the Kubeflow Model Registry (``registry``, a ``RegistryConfig`` with a
    ``url``); ``config`` is a ``DeployConfig`` (``storage_uri`` defaults to MODEL/hf).
    Writes ``decision.json`` and ``decision.md`` into ``output`` (see docs/kubeflow.md)."""
    import json

    from mtnlg import storage
    from mtnlg.cluster.serving import deploy_model
    from mtnlg.formats.rundir import HF_DIR

    metrics = evaluation_metrics(inputs.evaluation)
    if not config.storage_uri:
        if not storage.is_remote(inputs.model):
            raise ValueError(f"the fused model is at the local path {inputs.model}: KServe's storage initializer "
                             "needs gs://, s3:// or pvc:// (run with a gs:// or s3:// pipeline root, or set "
                             "storage_uri=pvc://CLAIM/PATH)")
        config = dataclasses.replace(config, storage_uri=storage.join(inputs.model, HF_DIR))
    lineage = {"model": inputs.model, "evaluation": inputs.evaluation, **({"pipeline_run": run_id} if run_id else {}),
               **(lineage or {})}
    decision = deploy_model(config, metrics, model_uri=inputs.model, run_id=run_id, custom=custom)
    if registry is not None and registry.url:
        from mtnlg.cluster.registry import register_model

        decision["registry"] = register_model(
            registry, name=registry.model_name or config.name, uri=config.storage_uri,
            version=registry.version or run_id or time_version(), metrics=metrics, lineage=lineage)
    storage.write_text(storage.join(output, "decision.json"), json.dumps(decision, indent=2, sort_keys=True) + "\n")
    storage.write_text(storage.join(output, "decision.md"), render_decision(decision))
    return StepOutput(output, decision)


def time_version() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def render_decision(d: dict[str, Any]) -> str:
    """The deploy decision as Markdown (the step's Markdown artifact in the Kubeflow UI)."""
    head = "Deployed" if d.get("deployed") else "Not deployed"
    lines = [f"# {head}: InferenceService {d.get('namespace')}/{d.get('name')}", "",
             f"**Why:** {d.get('reason')}", "", f"**Model:** `{d.get('storage_uri')}`", ""]
    if d.get("deployed"):
        lines += [f"**Action:** {d.get('action')}", "", f"**URL:** {d.get('url') or '(not reported)'}", "",
                  f"**OpenAI API:** `{d.get('openai_base_url') or '(no URL yet)'}`", ""]
    if d.get("metrics"):
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.6g} |" for k, v in sorted(d["metrics"].items())]
    if d.get("registry"):
        r = d["registry"]
        lines += ["", f"**Model Registry:** {r.get('name')} version {r.get('version')} "
                      f"(registered model {r.get('registered_model_id')}, version {r.get('model_version_id')})"]
    return "\n".join(lines) + "\n"
