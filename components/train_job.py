"""kfp component: the train step as a launcher of a Kubeflow TrainJob or PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(tokens: Input[Dataset], recipe: str, overrides: list, backend: str, nodes: int, gpus_per_node: int,
              job_overrides: list, run_id: str, timeout_s: int, cleanup: str,
              checkpoint: Output[Model], metrics: Output[Metrics]):
    """Train a GPT on nodes x GPUs as a Kubeflow TrainJob (Trainer v2) or PyTorchJob; this step
    creates the job, streams its node-0 log, and ends when the job does.

    Args:
        tokens: the tokenize step's .bin/.idx files and tokenizer (gs:// or s3://: the job's pods read them).
        recipe: named training recipe (debug, local, small-20m, mtnlg-1.3b, mtnlg-530b).
        overrides: TrainRunConfig settings over the recipe, key=value (e.g. "parallel.tp=8").
        backend: "trainjob" or "pytorchjob".
        nodes: nodes (pods) of the job.
        gpus_per_node: GPUs per node, one training process each (0 = CPU nodes).
        job_overrides: ClusterJobConfig settings, key=value (e.g. "memory=512Gi", "runtime=torch-distributed").
        run_id: the pipeline run's id: the job's name derives from it, so a retried step adopts its job.
        timeout_s: the step gives up (and deletes the job) after this many seconds (0 = never).
        cleanup: when to delete the finished job: on-success, on-failure, always, never.
    """
    from mtnlg.cluster.jobs import ClusterJobConfig
    from mtnlg.cluster.launcher import pod_namespace, pod_owner
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.config import load_config
    from mtnlg.steps import train_job_step
    from mtnlg.train.config import TrainRunConfig
    from mtnlg.train.config import recipe as recipe_data

    config = load_config(TrainRunConfig, overrides=overrides, base=recipe_data(recipe))
    job = load_config(ClusterJobConfig, overrides=job_overrides, base={
        "backend": backend, "nodes": nodes, "gpus_per_node": gpus_per_node, "namespace": pod_namespace()})
    result = train_job_step(artifact_location(tokens), artifact_location(checkpoint), config, job=job, run_id=run_id,
                            timeout_s=timeout_s or None, cleanup=cleanup, owner=pod_owner(namespace=job.namespace))
    checkpoint.metadata["recipe"] = recipe
    checkpoint.metadata["backend"] = backend
    log_metrics(metrics, result)
