"""kfp component: the tokenize step -> token ``Dataset``, tokenizer ``Model``, ``Metrics``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mtnlg.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def tokenize(extracted: Input[Dataset], overrides: list, tokens: Output[Dataset],
             tokenizer: Output[Model], metrics: Output[Metrics]):
    """Train SentencePiece and write Megatron .bin/.idx files for both splits."""
    from mtnlg import storage
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.steps import tokenize_step

    out = artifact_location(tokens)
    stats = tokenize_step(artifact_location(extracted), out, overrides)
    storage.copy(storage.join(out, "tokenizer.model"), artifact_location(tokenizer))
    tokenizer.metadata["vocab_size"] = int(stats.get("vocab_size", 0))
    log_metrics(metrics, stats)
