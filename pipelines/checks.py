"""The pipeline's parameters checked before a run starts: every step's typed config built
from them as the step will build it, and the training layout checked for the processes the
run will have. ``mtnlg run`` and ``mtnlg submit`` call it, so a mistake in any step's
settings is one ``ConfigError`` naming the parameter and the key, not a failure (retried)
inside the step an hour later.
"""

from __future__ import annotations

import re
from typing import Any

# a Kubernetes resource quantity (apimachinery's resource.Quantity): a number and a suffix
QUANTITY = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
# the pipeline's named training settings, passed to pipeline_run_config as the components do
TRAIN_NAMED = ("model_preset", "num_layers", "hidden_size", "num_heads", "seq_length", "tp", "pp", "steps",
               "global_batch_size")


def check_parameters(values: dict[str, Any], names: dict[str, str] | None = None, backend: str = "") -> None:
    """Check a run's parameter ``values`` (the pipeline's defaults with the run's own over
    them). Parameters a pipeline does not have are not checked. Messages call a parameter by
    ``names[param]`` when given (``mtnlg run`` calls ``train_overrides`` ``--train``);
    ``backend`` is the training backend the pipeline was compiled for (trainjob, pytorchjob)."""
    from mtnlg.config import ConfigError, load_config

    def label(param: str) -> str:
        return (names or {}).get(param, param)

    def step(param: str, cls, base: dict | None = None) -> None:
        if param not in values:
            return
        overrides = values[param]
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{label(param)}: expected a list of key=value strings, got {overrides!r}")
        try:
            load_config(cls, overrides=overrides, base=base)
        except ConfigError as e:
            raise ConfigError(f"{label(param)}: {e}") from None

    for name, value in values.items():
        if name.endswith(("_cpu", "_memory")) and not (isinstance(value, str) and QUANTITY.match(value)):
            raise ConfigError(f"{label(name)}: {value!r} is not a Kubernetes quantity (e.g. \"2\", \"500m\", "
                              "\"8Gi\", \"512Mi\")")
    for name in ("extract_workers", "nproc", "nodes"):
        if name in values and (not isinstance(values[name], int) or values[name] < 1):
            raise ConfigError(f"{label(name)}: must be an integer >= 1, got {values[name]!r}")
    from mtnlg.evaluate.config import EvaluateConfig
    from mtnlg.extract.config import ExtractConfig
    from mtnlg.fuse.config import FuseConfig
    from mtnlg.tokenize.config import TokenizeConfig

    step("extract_overrides", ExtractConfig)
    step("tokenize_overrides", TokenizeConfig, {"vocab_size": values["vocab_size"]} if values.get("vocab_size") else None)
    step("fuse_overrides", FuseConfig)
    step("evaluate_overrides", EvaluateConfig)
    if "train_overrides" in values:
        _check_training(values, label)
    if "job_overrides" in values:  # a job pipeline: the ClusterJobConfig its launcher will build
        from mtnlg.cluster.jobs import ClusterJobConfig

        base = {k: values[k] for k in ("nodes", "gpus_per_node", "queue_name", "priority_class") if k in values}
        step("job_overrides", ClusterJobConfig, {**base, **({"backend": backend} if backend else {})})
    if "deploy_overrides" in values:
        from mtnlg.cluster.registry import RegistryConfig
        from mtnlg.cluster.serving import DeployConfig

        step("deploy_overrides", DeployConfig, {"name": values.get("deploy_name") or "mtnlg-gpt"})
        step("registry_overrides", RegistryConfig)


def _check_training(values: dict[str, Any], label) -> None:
    from mtnlg.config import ConfigError
    from mtnlg.train.config import pipeline_run_config

    if "nodes" in values:  # a TrainJob / PyTorchJob: one process per GPU, or one per CPU node
        world = values["nodes"] * max(1, int(values.get("gpus_per_node") or 0))
        how = f"nodes={values['nodes']} x gpus_per_node={values.get('gpus_per_node') or 0}"
    else:
        world = int(values.get("nproc") or 1)
        how = f"{label('nproc')} {world}" if label("nproc") != "nproc" else f"nproc={world}"
    overrides = values["train_overrides"]
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{label('train_overrides')}: expected a list of key=value strings, got {overrides!r}")
    try:
        cfg = pipeline_run_config(values.get("recipe") or "debug", overrides, values.get("train_config") or "",
                                  **{k: values[k] for k in TRAIN_NAMED if k in values})
        cfg.check_layout(world, paths=False)
    except ConfigError as e:
        hint = f" ({how} training processes)" if "world size" in str(e) else ""
        raise ConfigError(f"{label('train_overrides')}: {e}{hint}") from None
