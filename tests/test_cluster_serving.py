"""The deploy step's KServe InferenceService: strict validation against the real CRD and
runtime, the gate, and the create/update/wait path with the real ``kubernetes`` client
against the in-process API emulator (a test-side controller plays KServe)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from kube_emulator import KubeEmulator

from mtnlg.cluster.schema import load_crd_schema, validate_object
from mtnlg.cluster.serving import (GROUP, MANAGED_BY, METRICS_ANNOTATION, PLURAL, VERSION, DeployConfig, DeployFailed,
                                   DeployRejected, ModelFacts, deploy_model, gate, inference_service, read_model_facts,
                                   service_state, size_service)
from mtnlg.config import ConfigError, load_config

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
CRD = SCHEMAS / "serving.kserve.io_inferenceservices.yaml"
RUNTIME = SCHEMAS / "kserve-huggingfaceserver-runtime.yaml"
NS = "team-a"
ISVC = (GROUP, VERSION, PLURAL)
METRICS = {"val_perplexity": 120.5, "val_loss": 4.79, "val_bits_per_byte": 2.1, "cloze_accuracy": 0.08,
           "cloze_items": 496, "samples": ["not recorded"]}


def config(**kw) -> DeployConfig:
    base = dict(name="gpt-docs", namespace=NS, storage_uri="gs://bucket/run/model/hf", poll_s=0.05, timeout_s=10)
    return DeployConfig(**{**base, **kw})


# ------------------------------------------------------------------ the object


@pytest.mark.skipif(not CRD.exists(), reason="../shared/schemas has no InferenceService CRD")
def test_inference_service_validates_strictly_against_the_crd():
    schema = load_crd_schema(CRD)
    for c in (config(), config(gpus=1, backend="vllm", max_model_len=2048, service_account="sa-gcs",
                               node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
                               min_replicas=0, max_replicas=3, args=["--dtype=bfloat16"])):
        obj = inference_service(c, METRICS, model_uri="gs://bucket/run/model", run_id="run-123")
        validate_object(obj, schema)
    bad = inference_service(config(), METRICS)
    bad["spec"]["predictor"]["model"]["storageUrl"] = bad["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(ConfigError, match="storageUrl"):
        validate_object(bad, schema)
    # the CRD's served, stored version is the one generated
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert [v["name"] for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")] == [VERSION]


@pytest.mark.skipif(not RUNTIME.exists(), reason="../shared/schemas has no kserve-huggingfaceserver runtime")
def test_inference_service_matches_the_huggingface_runtime():
    rt = yaml.safe_load(RUNTIME.read_text())
    obj = inference_service(config(gpus=2), METRICS)
    model = obj["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    assert "--model_name=gpt-docs" in model["args"]  # overrides the runtime's --model_name={{.Name}} default
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "2"
    recorded = json.loads(obj["metadata"]["annotations"][METRICS_ANNOTATION])
    assert recorded == {k: METRICS[k] for k in ("val_perplexity", "val_loss", "val_bits_per_byte",
                                                "cloze_accuracy", "cloze_items")}
    assert obj["metadata"]["labels"][MANAGED_BY] == "mtnlg"


def fused_model(directory: Path, parameters: int, dtype: str, seq_length: int) -> str:
    """The two files of a fused model directory that sizing reads."""
    directory.mkdir(parents=True, exist_ok=True)
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    (directory / "manifest.json").write_text(json.dumps({"format": "mtnlg-fused-1", "dtype": dtype,
                                                         "parameters": parameters,
                                                         "weight_bytes": parameters * itemsize, "files": {}}))
    (directory / "config.json").write_text(json.dumps({"seq_length": seq_length, "num_layers": 24}))
    return str(directory)


GPT_125M = ModelFacts(parameters=125_000_000, weight_bytes=500_000_000, dtype="fp32", context=1024)
GPT_1B3 = ModelFacts(parameters=1_300_000_000, weight_bytes=2_600_000_000, dtype="bf16", context=2048)
GPT_8B3 = ModelFacts(parameters=8_300_000_000, weight_bytes=33_200_000_000, dtype="fp32", context=2048)


@pytest.mark.parametrize("model, kw, gpus, cpu, memory, args", [
    (None, {}, 0, "1", "4Gi", []),                                  # nothing known: the fixed defaults
    (GPT_125M, {}, 0, "1", "4Gi", []),                              # 0.7 GiB in fp32 on CPU: the 4Gi floor
    (GPT_1B3, {}, 1, "4", "6Gi", ["--dtype=bfloat16", "--max_model_len=2048"]),   # past 1B: a GPU and vLLM
    (GPT_8B3, {}, 1, "4", "49Gi", ["--dtype=float32", "--max_model_len=2048"]),   # 8.3e9 x 4 B x 1.5 + 2Gi
    (GPT_1B3, {"gpus": 0}, 0, "1", "10Gi", []),                     # on CPU, the runtime loads float32
    (GPT_1B3, {"backend": "huggingface"}, 1, "4", "6Gi", []),         # not vLLM: its own defaults
    (GPT_1B3, {"memory": "32Gi", "cpu": "8", "dtype": "float16", "args": ["--max-model-len=512"]}, 1, "8", "32Gi",
     ["--dtype=float16"]),                                          # explicit settings win
    (GPT_125M, {"backend": "vllm", "gpus": 1}, 1, "4", "4Gi", ["--dtype=float32", "--max_model_len=1024"]),
])
def test_the_service_is_sized_from_the_model_it_serves(model, kw, gpus, cpu, memory, args):
    size = size_service(config(**kw), model)
    assert (size.gpus, size.cpu, size.memory, size.args) == (gpus, cpu, memory, args)
    obj = inference_service(config(**kw), METRICS, model=model)
    res = obj["spec"]["predictor"]["model"]["resources"]
    want = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    assert res == {"requests": want, "limits": want}
    assert obj["spec"]["predictor"]["model"]["args"] == ["--model_name=gpt-docs",
                                                         *([f"--backend={kw['backend']}"] if "backend" in kw else []),
                                                         *args, *kw.get("args", [])]
    if CRD.exists():
        validate_object(obj, load_crd_schema(CRD))


def test_model_facts_are_read_from_the_fused_model(tmp_path):
    assert read_model_facts(fused_model(tmp_path / "m", 1_300_000_000, "bf16", 2048)) == GPT_1B3
    assert read_model_facts(str(tmp_path / "missing")) is None      # logged; the fixed defaults then apply


@pytest.mark.parametrize("override, match", [
    ("name=GPT_Docs", "RFC 1123 subdomain"), ("storage_uri=/local/dir", "storage_uri"),
    ("min_replicas=3", "exceeds max_replicas"), ("backend=tgi", "backend"), ("max_val_perplexity=-1", "max_val"),
    ("colour=blue", "colour"), ("memory=4GB", "memory: '4GB' is not a Kubernetes quantity"), ("dtype=fp8", "dtype"),
])
def test_bad_deploy_configs_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DeployConfig, None, [override])


# ------------------------------------------------------------------ the gate


def _deployed(**metrics) -> dict:
    return {"metadata": {"labels": {MANAGED_BY: "mtnlg"}, "annotations": {METRICS_ANNOTATION: json.dumps(metrics)}}}


def test_gate():
    assert gate(config(max_val_perplexity=150), METRICS, None).deploy
    no = gate(config(max_val_perplexity=100), METRICS, None)
    assert not no.deploy and "120.5 is above max_val_perplexity=100" in no.reason
    assert not gate(config(max_val_perplexity=100), {"val_loss": 1.0}, None).deploy  # nothing to compare
    # against the deployed model: bits per byte when both have it (tokenizers may differ)
    assert gate(config(), METRICS, _deployed(val_perplexity=50.0, val_bits_per_byte=2.2)).deploy
    worse = gate(config(), METRICS, _deployed(val_perplexity=500.0, val_bits_per_byte=2.0))
    assert not worse.deploy and "val_bits_per_byte 2.1 is worse than the deployed model's 2" in worse.reason
    assert gate(config(max_regression=0.1), METRICS, _deployed(val_bits_per_byte=2.0)).deploy
    # perplexity when bits per byte is missing on either side
    assert not gate(config(), METRICS, _deployed(val_perplexity=100.0)).deploy
    assert gate(config(no_worse_than_deployed=False), METRICS, _deployed(val_perplexity=100.0)).deploy
    assert gate(config(), METRICS, _deployed()).deploy  # nothing recorded to compare with


def test_service_state():
    ready = {"metadata": {"generation": 2}, "status": {"observedGeneration": 2, "conditions": [
        {"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]}}
    assert service_state(ready)[0] == "Ready"
    stale = {"metadata": {"generation": 3}, "status": ready["status"]}
    assert service_state(stale)[0] != "Ready"          # Ready, but for the previous spec
    failed = {"status": {"modelStatus": {"states": {"targetModelState": "FailedToLoad"},
                                         "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no config.json"}}}}
    assert service_state(failed) == ("Failed", "ModelLoadFailed", "no config.json")
    assert service_state({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing",
                                                     "message": "Configuration has not yet been reconciled"}]}})[:2] \
        == ("NotReady", "RevisionMissing")


# ------------------------------------------------------------------ create, update, wait (emulator)


@pytest.fixture
def kube():
    with KubeEmulator() as emulator:
        emulator.declare_resource(GROUP, VERSION, PLURAL, "InferenceService")
        yield emulator
        assert emulator.server_errors == []


def kserve(kube, outcome: str = "ready"):
    """A test-side KServe: on every new spec, report it Ready (or a failed load) for that generation."""
    seen: set[tuple[str, int]] = set()

    def react(kind, obj):
        meta = obj["metadata"]
        key = (meta["name"], meta.get("generation", 1))
        if kind == "DELETED" or key in seen:
            return
        seen.add(key)
        if outcome == "ready":
            kube.set_conditions(*ISVC, meta["namespace"], meta["name"],
                                [{"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}],
                                observedGeneration=meta.get("generation", 1),
                                url=f"http://{meta['name']}.{meta['namespace']}.example.com")
        elif outcome == "fail":
            kube.set_status(*ISVC, meta["namespace"], meta["name"], modelStatus={
                "states": {"targetModelState": "FailedToLoad"},
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "config.json not found in /mnt/models"}})

    kube.on(*ISVC, react, events=("ADDED", "MODIFIED"))


def test_deploy_creates_then_updates_and_waits_until_ready(kube, tmp_path):
    kserve(kube)
    model = fused_model(tmp_path / "model", 1_300_000_000, "bf16", 2048)   # the fuse step's output
    out = deploy_model(config(max_val_perplexity=200), METRICS, model_uri=model, run_id="run-1",
                       custom=kube.custom_objects)
    assert out["deployed"] and out["action"] == "created"
    assert out["openai_base_url"] == "http://gpt-docs.team-a.example.com/openai/v1"
    assert out["resources"] == {"gpus": 1, "cpu": "4", "memory": "6Gi",
                                "args": ["--dtype=bfloat16", "--max_model_len=2048"]}
    obj = kube.get_object(*ISVC, NS, "gpt-docs")
    assert obj["spec"]["predictor"]["model"]["storageUri"] == "gs://bucket/run/model/hf"
    assert obj["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert obj["metadata"]["annotations"]["mtnlg.kubeflow.org/pipeline-run"] == "run-1"
    # a better model replaces it: same object, new generation, new metrics
    better = {**METRICS, "val_perplexity": 90.0, "val_bits_per_byte": 1.9}
    c2 = config(storage_uri="gs://bucket/run2/model/hf")
    out2 = deploy_model(c2, better, run_id="run-2", custom=kube.custom_objects)
    assert out2["deployed"] and out2["action"] == "updated"
    obj2 = kube.get_object(*ISVC, NS, "gpt-docs")
    assert obj2["metadata"]["uid"] == obj["metadata"]["uid"]
    assert obj2["spec"]["predictor"]["model"]["storageUri"] == "gs://bucket/run2/model/hf"
    assert json.loads(obj2["metadata"]["annotations"][METRICS_ANNOTATION])["val_bits_per_byte"] == 1.9
    # a worse one is refused by the gate and changes nothing
    worse = {**METRICS, "val_bits_per_byte": 2.5}
    out3 = deploy_model(config(storage_uri="gs://bucket/run3/model/hf"), worse, custom=kube.custom_objects)
    assert not out3["deployed"] and out3["action"] == "skipped" and "worse" in out3["reason"]
    assert kube.get_object(*ISVC, NS, "gpt-docs")["metadata"]["generation"] == obj2["metadata"]["generation"]
    assert kube.get_object(*ISVC, NS, "gpt-docs")["spec"]["predictor"]["model"]["storageUri"].startswith(
        "gs://bucket/run2/")
    with pytest.raises(DeployRejected, match="worse"):
        deploy_model(config(fail_on_gate=True), worse, custom=kube.custom_objects)
    # only what the Role grants: get/list/watch (GET), create (POST), update (PUT); no patch, no delete
    assert {r.method for r in kube.requests if "inferenceservices" in str(r.url)} == {"GET", "POST", "PUT"}


def test_deploy_does_not_overwrite_a_service_it_does_not_own(kube):
    kube.create_object(*ISVC, NS, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
                                   "metadata": {"name": "gpt-docs", "namespace": NS}, "spec": {"predictor": {}}})
    with pytest.raises(DeployFailed, match="not managed by mtnlg"):
        deploy_model(config(), METRICS, custom=kube.custom_objects)


def test_failed_load_and_timeout_are_reported(kube):
    kserve(kube, "fail")
    with pytest.raises(DeployFailed, match="ModelLoadFailed: config.json not found"):
        deploy_model(config(), METRICS, custom=kube.custom_objects)


def test_not_ready_times_out_with_the_conditions(kube):
    def not_ready(kind, obj):
        if kind == "ADDED":
            kube.set_conditions(*ISVC, NS, obj["metadata"]["name"], [
                {"type": "Ready", "status": "False", "reason": "RevisionMissing",
                 "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu"}])

    kube.on(*ISVC, not_ready)
    with pytest.raises(DeployFailed, match="not Ready after .*Insufficient nvidia.com/gpu"):
        deploy_model(config(timeout_s=1.0), METRICS, custom=kube.custom_objects)


def test_deploy_waits_for_the_new_generation_not_the_old_ready(kube):
    """An update of a Ready service is not done until KServe has reconciled the new spec."""
    kserve(kube)
    deploy_model(config(), METRICS, custom=kube.custom_objects)
    kube.wait_idle()
    done = threading.Event()
    result: dict = {}

    def second():
        result.update(deploy_model(config(storage_uri="gs://bucket/new/hf", no_worse_than_deployed=False), METRICS,
                                   custom=kube.custom_objects))
        done.set()

    t = threading.Thread(target=second)
    t.start()
    t.join(10)
    assert done.is_set() and result["action"] == "updated"
    obj = kube.get_object(*ISVC, NS, "gpt-docs")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"] >= 2
