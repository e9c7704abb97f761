import math

import pytest

from mtnlg.components.artifacts import artifact_location, log_metrics
from mtnlg.steps import StepOutput, flatten

pytestmark = pytest.mark.unit


class FakeArtifact:
    def __init__(self, uri, path):
        self.uri, self.path, self.logged = uri, path, {}

    def log_metric(self, k, v):
        self.logged[k] = v


def test_location_prefers_object_storage_uris(monkeypatch):
    for var in ("MTNLG_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    assert artifact_location(FakeArtifact("gs://b/root/task/out", "/gcs/b/root/task/out")) == "gs://b/root/task/out"
    assert artifact_location(FakeArtifact("s3://b/root/task/out", "/s3/b/root/task/out")) == "s3://b/root/task/out"
    assert artifact_location(FakeArtifact("/tmp/root/task/out", "/tmp/root/task/out")) == "/tmp/root/task/out"
    assert artifact_location(FakeArtifact("minio://b/x", "/minio/b/x")) == "/minio/b/x"   # no endpoint: the mount
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio-service.kubeflow:9000")
    assert artifact_location(FakeArtifact("minio://mlpipeline/v2/x", "/minio/mlpipeline/v2/x")) == \
        "s3://mlpipeline/v2/x"


def test_metrics_are_flattened_numeric_leaves():
    stats = {"read": 10, "dropped": {"too_short": 2, "symbols": 1}, "name": "x", "ok": True,
             "ppl": math.inf, "rate": 1.5, "samples": ["a"]}
    m = FakeArtifact("", "")
    flat = log_metrics(m, StepOutput("/out", stats))
    assert flat == m.logged == {"read": 10, "dropped.too_short": 2, "dropped.symbols": 1, "ok": 1.0, "rate": 1.5}
    assert flatten({"a": {"b": {"c": 1}}}, "x") == {"x.a.b.c": 1}
