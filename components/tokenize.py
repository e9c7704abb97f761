"""kfp component: the tokenize step -> token ``Dataset``, tokenizer ``Model``, ``Metrics``."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mtnlg.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def tokenize(extracted: Input[Dataset], vocab_size: int, overrides: list, tokens: Output[Dataset],
             tokenizer: Output[Model], metrics: Output[Metrics]):
    """Train SentencePiece and write Megatron .bin/.idx files for both splits.

    Args:
        extracted: the extract step's documents.
        vocab_size: SentencePiece vocabulary size (0 = the config's default, 32000).
        overrides: TokenizeConfig settings applied last, key=value (e.g. "model_type=unigram").
    """
    from mtnlg import storage
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.config import load_config
    from mtnlg.formats.rundir import TOKENIZER_MODEL
    from mtnlg.steps import tokenize_step
    from mtnlg.tokenize.config import TokenizeConfig

    base = {"vocab_size": vocab_size} if vocab_size else {}
    result = tokenize_step(artifact_location(extracted), artifact_location(tokens),
                           load_config(TokenizeConfig, overrides=overrides, base=base))
    storage.copy(storage.join(result.output, TOKENIZER_MODEL), artifact_location(tokenizer))
    tokenizer.metadata["vocab_size"] = int(result.stats.get("vocab_size", 0))
    log_metrics(metrics, result)
