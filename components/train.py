"""kfp component: the train step -> a checkpoint ``Model`` and training ``Metrics``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(tokens: Input[Dataset], recipe: str, model_preset: str, num_layers: int, hidden_size: int, num_heads: int,
          seq_length: int, tp: int, pp: int, steps: int, global_batch_size: int, overrides: list, train_config: str,
          nproc: int, checkpoint: Output[Model], metrics: Output[Metrics]):
    """Train a GPT (tensor/sequence/pipeline/data parallel) on the tokenized dataset.

    Args:
        tokens: the tokenize step's .bin/.idx files and tokenizer.
        recipe: named training recipe (debug, local, small-20m, mtnlg-1.3b, mtnlg-530b).
        model_preset: model preset over the recipe's ("" = the recipe's), e.g. "gpt-125m".
        num_layers: transformer layers (0 = the recipe's). hidden_size, num_heads, seq_length likewise.
        tp: tensor-parallel degree (0 = the recipe's). pp: pipeline-parallel degree likewise.
        steps: training steps (0 = the recipe's). global_batch_size likewise.
        overrides: TrainRunConfig settings applied last, key=value (e.g. "optim.lr=3e-4").
        train_config: a run config's YAML text over the recipe ("" = none): what `mtnlg submit --run` sends
            from the repository, so a changed config reaches the run without a new image.
        nproc: training processes in this step's pod (torchrun).
    """
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.steps import train_step
    from mtnlg.train.config import pipeline_run_config

    config = pipeline_run_config(recipe, overrides, train_config, model_preset=model_preset, num_layers=num_layers,
                                 hidden_size=hidden_size, num_heads=num_heads, seq_length=seq_length, tp=tp, pp=pp,
                                 steps=steps, global_batch_size=global_batch_size)
    result = train_step(artifact_location(tokens), artifact_location(checkpoint), config, nproc=nproc)
    checkpoint.metadata["recipe"] = recipe
    log_metrics(metrics, result)
