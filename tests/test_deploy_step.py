"""The deploy step end to end on the API emulator: the kfp component's body (with stand-in
artifacts) reads the evaluate step's metrics, gates, creates the InferenceService with the
real ``kubernetes`` client from a kubeconfig, waits for it, and writes its decision."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from kube_emulator import KubeEmulator

from mtnlg.cluster.serving import GROUP, PLURAL, VERSION, DeployConfig
from mtnlg.steps import DeployInputs, deploy_step

pytestmark = pytest.mark.unit

ISVC = (GROUP, VERSION, PLURAL)
METRICS = {"val_perplexity": 180.0, "val_loss": 5.19, "val_bits_per_byte": 2.4, "cloze_accuracy": 0.05,
           "cloze_items": 496}


@dataclass
class Artifact:
    """What a kfp component body sees of an artifact: a local path, a URI, metadata."""

    path: str
    uri: str = ""
    metadata: dict = field(default_factory=dict)

    def log_metric(self, key, value):
        self.metadata[key] = value


@pytest.fixture
def kube(monkeypatch, tmp_path):
    import kubernetes

    before = kubernetes.client.Configuration.get_default_copy()
    with KubeEmulator() as emulator:
        emulator.declare_resource(GROUP, VERSION, PLURAL, "InferenceService")

        seen: set = set()

        def ready(kind, obj):  # a test-side KServe: Ready for every new generation of the spec
            meta = obj["metadata"]
            key = (meta["name"], meta.get("generation", 1))
            if key in seen:
                return
            seen.add(key)
            emulator.set_conditions(*ISVC, meta["namespace"], meta["name"], [{"type": "Ready", "status": "True"}],
                                    observedGeneration=meta.get("generation", 1), url=f"http://{meta['name']}.example")
        emulator.on(*ISVC, ready, events=("ADDED", "MODIFIED"))
        monkeypatch.setenv("KUBECONFIG", str(emulator.write_kubeconfig(tmp_path / "kubeconfig", namespace="kubeflow")))
        yield emulator
    kubernetes.client.Configuration.set_default(before)


def _evaluation(tmp_path, metrics=METRICS) -> str:
    d = tmp_path / "report.html.d"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({**metrics, "samples": []}))
    return str(tmp_path / "report.html")


def test_deploy_component_gates_creates_and_records(kube, tmp_path):
    from mtnlg.components.deploy import deploy

    report = _evaluation(tmp_path)
    decision = Artifact(str(tmp_path / "decision.md"))
    metrics = Artifact(str(tmp_path / "metrics"))
    deploy.python_func(model=Artifact(str(tmp_path / "model"), uri="gs://bucket/root/run/fuse/model"),
                       report=Artifact(report), name="gpt-docs", overrides=["max_val_perplexity=200", "poll_s=0.05"],
                       registry_overrides=[], run_id="run-7", decision=decision, metrics=metrics)
    obj = kube.get_object(*ISVC, "kubeflow", "gpt-docs")
    assert obj["spec"]["predictor"]["model"]["storageUri"] == "gs://bucket/root/run/fuse/model/hf"
    assert obj["metadata"]["annotations"]["mtnlg.kubeflow.org/pipeline-run"] == "run-7"
    text = (tmp_path / "decision.md").read_text()
    assert text.startswith("# Deployed: InferenceService kubeflow/gpt-docs") and "http://gpt-docs.example" in text
    assert decision.metadata["deployed"] is True and metrics.metadata["deployed"] == 1.0
    saved = json.loads((tmp_path / "decision.md.d" / "decision.json").read_text())
    assert saved["action"] == "created" and saved["openai_base_url"] == "http://gpt-docs.example/openai/v1"


def test_deploy_step_refused_by_the_gate_creates_nothing(kube, tmp_path):
    out = deploy_step(DeployInputs("gs://bucket/run/model", _evaluation(tmp_path) + ".d"), str(tmp_path / "out"),
                      DeployConfig(name="gpt-docs", namespace="kubeflow", max_val_perplexity=100))
    assert out.stats["deployed"] is False and "above max_val_perplexity=100" in out.stats["reason"]
    assert kube.get_object(*ISVC, "kubeflow", "gpt-docs") is None
    assert (tmp_path / "out" / "decision.md").read_text().startswith("# Not deployed")


def test_deploy_step_needs_a_location_kserve_can_download(tmp_path):
    with pytest.raises(ValueError, match="local path .*gs://, s3:// or pvc://"):
        deploy_step(DeployInputs(str(tmp_path / "model"), _evaluation(tmp_path) + ".d"), str(tmp_path / "out"),
                    DeployConfig(name="gpt-docs"))
    with pytest.raises(FileNotFoundError, match="evaluate step's output"):
        deploy_step(DeployInputs("gs://b/m", str(tmp_path / "nowhere")), str(tmp_path / "out"), DeployConfig())


def test_deploy_step_registers_the_deployed_model(kube, tmp_path):
    """With a registry url, the deployed model, its metrics and lineage go to the Model
    Registry (the real client against the fake server); a retried step registers nothing new."""
    from model_registry_server import FakeModelRegistry

    from mtnlg.cluster.registry import RegistryConfig

    evaluation = _evaluation(tmp_path) + ".d"
    with FakeModelRegistry() as reg:
        registry = RegistryConfig(url=reg.url, author="ci")
        cfg = DeployConfig(name="gpt-docs", namespace="kubeflow", poll_s=0.05, timeout_s=20)
        out = deploy_step(DeployInputs("gs://bucket/run/model", evaluation), str(tmp_path / "out"), cfg,
                          run_id="run-9", registry=registry)
        r = out.stats["registry"]
        assert (r["name"], r["version"], r["uri"]) == ("gpt-docs", "run-9", "gs://bucket/run/model/hf")
        (model,) = reg.registered_models.values()
        assert model["name"] == "gpt-docs"
        (version,) = reg.model_versions.values()
        props = version["customProperties"]
        assert props["val_perplexity"]["double_value"] == 180.0 and props["pipeline_run"]["string_value"] == "run-9"
        writes = len(reg.writes())
        again = deploy_step(DeployInputs("gs://bucket/run/model", evaluation), str(tmp_path / "out2"), cfg,
                            run_id="run-9", registry=registry)
        assert again.stats["registry"]["model_version_id"] == r["model_version_id"] and len(reg.writes()) == writes
        assert "Model Registry:** gpt-docs version run-9" in (tmp_path / "out" / "decision.md").read_text()
