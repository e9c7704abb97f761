"""kfp component: the fuse step -> one unified ``Model`` (safetensors + Hugging Face export)."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def fuse(checkpoint: Input[Model], model: Output[Model], metrics: Output[Metrics]):
    """Merge the tensor/data-parallel checkpoint shards into one model directory."""
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.steps import fuse_step

    result = fuse_step(artifact_location(checkpoint), artifact_location(model), hf=True)
    model.metadata["format"] = "safetensors"
    log_metrics(metrics, result)
