"""kfp component: the train step -> a checkpoint ``Model`` and training ``Metrics``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(tokens: Input[Dataset], recipe: str, overrides: list, nproc: int,
          checkpoint: Output[Model], metrics: Output[Metrics]):
    """Train a GPT (tensor/sequence/data parallel) on the tokenized dataset."""
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.steps import train_step

    summary = train_step(artifact_location(tokens), artifact_location(checkpoint), recipe, overrides, nproc)
    checkpoint.metadata["recipe"] = recipe
    log_metrics(metrics, summary)
