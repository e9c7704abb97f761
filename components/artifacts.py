"""Glue between kfp artifacts and the library: where to write, how to report metrics.

Kept free of kfp imports so the step functions can be tested with plain fakes.
"""

from __future__ import annotations

import math
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


def flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict, with dotted keys (``failed.corrupt_gzip``)."""
    out: dict[str, float] = {}
    for k, v in stats.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = v
    return out


def log_metrics(metrics: Any, stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Log every numeric leaf of ``stats`` on a kfp ``Metrics`` artifact; returns them."""
    flat = flatten(stats, prefix)
    for k, v in flat.items():
        metrics.log_metric(k, v)
    return flat
