"""kfp component: the extract step (Apache Beam) -> a ``Dataset`` and its ``Metrics``."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from mtnlg.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def extract(inputs: list, overrides: list, workers: int, beam_args: list,
            dataset: Output[Dataset], metrics: Output[Metrics]):
    """Clean, filter, deduplicate and split raw text into train/validation JSONL."""
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.steps import extract_step

    stats = extract_step(inputs, artifact_location(dataset), overrides, workers, beam_args)
    log_metrics(metrics, stats)
