"""kfp component: the train step as a launcher of a Kubeflow TrainJob or PyTorchJob."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train(tokens: Input[Dataset], recipe: str, model_preset: str, num_layers: int, hidden_size: int, num_heads: int,
          seq_length: int, tp: int, pp: int, steps: int, global_batch_size: int, overrides: list, train_config: str,
          backend: str, nodes: int, gpus_per_node: int, job_overrides: list, run_id: str, timeout_s: int, cleanup: str,
          volume_claim: str, volume_mount: str, checkpoint: Output[Model], metrics: Output[Metrics],
          queue_name: str = "", priority_class: str = ""):
    """Train a GPT on nodes x GPUs as a Kubeflow TrainJob (Trainer v2) or PyTorchJob; this step
    creates the job, streams its node-0 log, and ends when the job does.

    Args:
        tokens: the tokenize step's .bin/.idx files and tokenizer (gs:// or s3://: the job's pods read them).
        recipe: named training recipe (debug, local, small-20m, mtnlg-1.3b, mtnlg-530b).
        model_preset: model preset over the recipe's ("" = the recipe's), e.g. "mtnlg-8.3b".
        num_layers: transformer layers (0 = the recipe's). hidden_size, num_heads, seq_length likewise.
        tp: tensor-parallel degree (0 = the recipe's). pp: pipeline-parallel degree likewise.
        steps: training steps (0 = the recipe's). global_batch_size likewise.
        overrides: TrainRunConfig settings applied last, key=value (e.g. "optim.lr=1.5e-4").
        train_config: a run config's YAML text over the recipe ("" = none): what `mtnlg submit --run` sends
            from the repository, so a changed config reaches the run without a new image.
        backend: "trainjob" or "pytorchjob".
        nodes: nodes (pods) of the job.
        gpus_per_node: GPUs per node, one training process each (0 = CPU nodes).
        job_overrides: ClusterJobConfig settings, key=value (e.g. "memory=512Gi", "runtime=torch-distributed").
        run_id: the pipeline run's id: the job's name derives from it, so a retried step adopts its job.
        timeout_s: the step gives up (and deletes the job) after this many seconds (0 = never).
        cleanup: when to delete the finished job: on-success, on-failure, always, never.
        volume_claim: a ReadWriteMany PVC mounted here and on every node at volume_mount ("" = none): where
            the tokens and the run are staged when the pipeline root is not object storage the pods reach.
        volume_mount: where that PVC is mounted.
        queue_name: the Kueue LocalQueue the job waits in ("" = none): the job runs when Kueue admits it.
        priority_class: the job's Kueue WorkloadPriorityClass ("" = none).
    """
    import os

    from mtnlg.cluster.jobs import ClusterJobConfig, with_kfp_store
    from mtnlg.cluster.incluster import pod_namespace, pod_owner
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.config import load_config
    from mtnlg.steps import train_job_step
    from mtnlg.train.config import pipeline_run_config

    config = pipeline_run_config(recipe, overrides, train_config, model_preset=model_preset, num_layers=num_layers,
                                 hidden_size=hidden_size, num_heads=num_heads, seq_length=seq_length, tp=tp, pp=pp,
                                 steps=steps, global_batch_size=global_batch_size)
    job = load_config(ClusterJobConfig, overrides=job_overrides, base={
        "backend": backend, "nodes": nodes, "gpus_per_node": gpus_per_node, "namespace": pod_namespace(),
        "volume_claim": volume_claim, "volume_mount": volume_mount, "queue_name": queue_name,
        "priority_class": priority_class})
    job = with_kfp_store(job, [tokens.uri, checkpoint.uri], dict(os.environ))  # KFP's own store: its S3 access
    result = train_job_step(artifact_location(tokens), artifact_location(checkpoint), config, job=job, run_id=run_id,
                            timeout_s=timeout_s or None, cleanup=cleanup, owner=pod_owner(namespace=job.namespace))
    checkpoint.metadata["recipe"] = recipe
    checkpoint.metadata["backend"] = backend
    log_metrics(metrics, result)
