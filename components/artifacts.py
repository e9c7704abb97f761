"""Glue between kfp artifacts and the library: where to write, how to report metrics.

Kept free of kfp imports so the component bodies can be tested with plain fakes.
"""

from __future__ import annotations

from typing import Any


def artifact_location(artifact: Any) -> str:
    """The path or URI a step should read/write for a kfp artifact.

    With a ``gs://`` or ``s3://`` pipeline root the artifact's ``uri`` is used directly
    (google-cloud-storage, boto3): job pods launched by the step can reach it too. KFP's
    default MinIO root gives ``minio://BUCKET/KEY``: read as ``s3://BUCKET/KEY`` when an S3
    endpoint is configured for the step (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or
    ``MTNLG_S3_ENDPOINT_URL``, e.g. ``http://minio-service.kubeflow:9000``, with the
    ``mlpipeline-minio-artifact`` secret's keys as ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``); otherwise the local ``path`` (kfp.local, or the launcher's mount).
    """
    uri = getattr(artifact, "uri", "") or ""
    if uri.startswith(("gs://", "s3://")):
        return uri
    from mtnlg import storage

    if uri.startswith("minio://") and storage.s3_endpoint():
        return "s3://" + uri[len("minio://"):]
    return artifact.path


def log_metrics(metrics: Any, result: Any) -> dict[str, float]:
    """Log every numeric figure of a step's result (``mtnlg.steps.StepOutput``) on a kfp
    ``Metrics`` artifact; returns them."""
    flat = result.metrics()
    for k, v in flat.items():
        metrics.log_metric(k, v)
    return flat
