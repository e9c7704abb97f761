"""kfp component: the evaluate step -> ``Metrics``, an ``HTML`` and a ``Markdown`` report."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], tokens: Input[Dataset], checkpoint: Input[Model], overrides: list,
             metrics: Output[Metrics], report: Output[HTML], summary: Output[Markdown]):
    """Validation perplexity, last-word accuracy and sample generations, with the loss curve.

    Args:
        model: the fuse step's model directory.
        tokens: the tokenize step's output (its validation split is evaluated).
        checkpoint: the train step's run directory (its log.jsonl gives the loss curve).
        overrides: EvaluateConfig settings as key=value (e.g. "max_cloze_items=200", "max_new_tokens=48").
    """
    from mtnlg import storage
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.config import load_config
    from mtnlg.evaluate.config import EvaluateConfig
    from mtnlg.formats.rundir import LOG_FILE
    from mtnlg.steps import EvaluateInputs, evaluate_step

    train_log = storage.join(artifact_location(checkpoint), LOG_FILE)
    inputs = EvaluateInputs(artifact_location(model), artifact_location(tokens),
                            train_log if storage.exists(train_log) else None)
    result = evaluate_step(inputs, artifact_location(report) + ".d", load_config(EvaluateConfig, overrides=overrides))
    files = result.stats["files"]
    storage.copy(files["html"], artifact_location(report))
    storage.copy(files["markdown"], artifact_location(summary))
    log_metrics(metrics, result)
