"""kfp component: the extract step (Apache Beam) -> a ``Dataset`` and its ``Metrics``."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from mtnlg.images import DATA_IMAGE


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def extract(inputs: list, overrides: list, workers: int, beam_args: list,
            dataset: Output[Dataset], metrics: Output[Metrics]):
    """Clean, filter, deduplicate and split raw text into train/validation JSONL.

    Args:
        inputs: raw text: files, folders, globs or gs:// URIs (.txt, .jsonl, .html, optionally .gz).
        overrides: ExtractConfig settings as key=value (e.g. "dedup.threshold=0.7", "validation_fraction=0.05").
        workers: Beam DirectRunner worker processes (other runners: see beam_args).
        beam_args: Beam pipeline options, e.g. ["--runner=DataflowRunner", "--project=P", "--region=R"].
    """
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.config import load_config
    from mtnlg.extract.config import ExtractConfig
    from mtnlg.steps import extract_step

    result = extract_step(inputs, artifact_location(dataset), load_config(ExtractConfig, overrides=overrides),
                          workers=workers, beam_args=beam_args)
    log_metrics(metrics, result)
