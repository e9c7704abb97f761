"""Glue between kfp artifacts and the library: where to write, how to report metrics.

Kept free of kfp imports so the component bodies can be tested with plain fakes.
"""

from __future__ import annotations

from typing import Any


def artifact_location(artifact: Any) -> str:
    """The path or URI a step should read/write for a kfp artifact.

    On a cluster with a ``gs://`` pipeline root the artifact's ``uri`` is used directly
    (through google-cloud-storage); otherwise its local ``path`` (kfp.local, or a mount).
    """
    uri = getattr(artifact, "uri", "") or ""
    if uri.startswith("gs://"):
        return uri
    return artifact.path


def log_metrics(metrics: Any, result: Any) -> dict[str, float]:
    """Log every numeric figure of a step's result (``mtnlg.steps.StepOutput``) on a kfp
    ``Metrics`` artifact; returns them."""
    flat = result.metrics()
    for k, v in flat.items():
        metrics.log_metric(k, v)
    return flat
