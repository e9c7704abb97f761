"""kfp component: the evaluate step -> ``Metrics``, an ``HTML`` and a ``Markdown`` report."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], tokens: Input[Dataset], checkpoint: Input[Model], metrics: Output[Metrics],
             report: Output[HTML], summary: Output[Markdown]):
    """Validation perplexity, last-word accuracy and sample generations, with the loss curve."""
    from mtnlg import storage
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.steps import evaluate_step

    out = artifact_location(report) + ".d"
    train_log = storage.join(artifact_location(checkpoint), "log.jsonl")
    result = evaluate_step(artifact_location(model), artifact_location(tokens), out,
                           train_log if storage.exists(train_log) else None)
    storage.copy(storage.join(out, "report.html"), artifact_location(report))
    storage.copy(storage.join(out, "report.md"), artifact_location(summary))
    log_metrics(metrics, result)
