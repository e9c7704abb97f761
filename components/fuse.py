"""kfp component: the fuse step -> one unified ``Model`` (safetensors + Hugging Face export)."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def fuse(checkpoint: Input[Model], overrides: list, model: Output[Model], metrics: Output[Metrics]):
    """Merge the tensor/pipeline/data-parallel checkpoint shards into one model directory.

    Args:
        checkpoint: the train step's run directory (its latest checkpoint is fused).
        overrides: FuseConfig settings as key=value (e.g. "dtype=bf16", "hf=false").
    """
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.config import load_config
    from mtnlg.fuse.config import FuseConfig
    from mtnlg.steps import fuse_step

    result = fuse_step(artifact_location(checkpoint), artifact_location(model),
                       load_config(FuseConfig, overrides=overrides))
    model.metadata["format"] = "safetensors"
    log_metrics(metrics, result)
