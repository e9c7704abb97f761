"""kfp component: the train step -> a checkpoint ``Model`` and training ``Metrics``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(tokens: Input[Dataset], recipe: str, overrides: list, nproc: int,
          checkpoint: Output[Model], metrics: Output[Metrics]):
    """Train a GPT (tensor/sequence/pipeline/data parallel) on the tokenized dataset.

    Args:
        tokens: the tokenize step's .bin/.idx files and tokenizer.
        recipe: named training recipe (debug, local, small-20m, mtnlg-1.3b, mtnlg-530b).
        overrides: TrainRunConfig settings over the recipe, key=value (e.g. "parallel.tp=2", "train.steps=1000").
        nproc: training processes in this step's pod (torchrun).
    """
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.config import load_config
    from mtnlg.steps import train_step
    from mtnlg.train.config import TrainRunConfig
    from mtnlg.train.config import recipe as recipe_data

    config = load_config(TrainRunConfig, overrides=overrides, base=recipe_data(recipe))
    result = train_step(artifact_location(tokens), artifact_location(checkpoint), config, nproc=nproc)
    checkpoint.metadata["recipe"] = recipe
    log_metrics(metrics, result)
