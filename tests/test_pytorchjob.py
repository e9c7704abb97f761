"""PyTorchJob manifests: the operator's webhook rules, and the real CRD schema when present."""

import copy
from pathlib import Path

import pytest
import yaml

from mtnlg.cluster.pytorchjob import (PyTorchJobLauncher, PyTorchJobSpec, build_manifests, check_webhook_rules,
                                      load_crd_schema, validate_pytorchjob)
from mtnlg.config import ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT.parent / "shared" / "schemas" / "kubeflow.org_pytorchjobs.yaml"


@pytest.fixture(scope="module")
def schema():
    if not CRD.exists():
        pytest.skip(f"PyTorchJob CRD not found at {CRD}")
    return load_crd_schema(CRD)


def _job(nodes=2, nproc=8, gpus=8):
    spec = PyTorchJobSpec(name="gpt-test", image="registry/mtnlg-train:0.1.0", run_config={"output": "gs://b/run"},
                          nodes=nodes, nproc_per_node=nproc, gpus_per_node=gpus, memory="64Gi")
    return build_manifests(spec, ["train.steps=10"])


def test_generated_job_shape():
    cm, job = _job()
    assert cm["kind"] == "ConfigMap" and "config.yaml" in cm["data"]
    assert yaml.safe_load(cm["data"]["config.yaml"]) == {"output": "gs://b/run"}
    reps = job["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "8"
    c = reps["Worker"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch"
    assert c["command"][:3] == ["torchrun", "-m", "mtnlg.train.cli"] and c["command"][-1] == "train.steps=10"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    single = _job(nodes=1, nproc=1, gpus=0)[1]
    assert list(single["spec"]["pytorchReplicaSpecs"]) == ["Master"]


@pytest.mark.parametrize("nodes,nproc,gpus", [(1, 1, 0), (2, 8, 8), (4, 4, 4)])
def test_generated_jobs_match_crd_schema(schema, nodes, nproc, gpus):
    validate_pytorchjob(_job(nodes, nproc, gpus)[1], schema)


def test_bundled_manifest_is_valid(schema):
    job = yaml.safe_load((ROOT / "manifests" / "base" / "pytorchjob.yaml").read_text())
    validate_pytorchjob(job, schema)


def test_schema_rejects_wrong_types(schema):
    job = copy.deepcopy(_job()[1])
    job["spec"]["nprocPerNode"] = 8  # must be a string
    with pytest.raises(ConfigError, match="nprocPerNode"):
        validate_pytorchjob(job, schema)
    job = copy.deepcopy(_job()[1])
    job["spec"]["runPolicy"]["backoffLimit"] = "three"
    with pytest.raises(ConfigError, match="backoffLimit"):
        validate_pytorchjob(job, schema)


@pytest.mark.parametrize("mutate, message", [
    (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Chief=j["spec"]["pytorchReplicaSpecs"]["Master"]),
     "replica type must be Master or Worker"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2), "Master.replicas must be 1"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0), "Worker.replicas must be >= 1"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0].update(name="main"),
     "container named 'pytorch'"),
    (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0].update(image=""),
     "has no image"),
    (lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 8}), "must not both be set"),
    (lambda j: (j["spec"]["pytorchReplicaSpecs"].pop("Worker"), j["spec"].update(elasticPolicy={})),
     "elasticPolicy needs a Worker"),
])
def test_webhook_rules(mutate, message):
    job = copy.deepcopy(_job()[1])
    mutate(job)
    with pytest.raises(ConfigError, match=message):
        check_webhook_rules(job)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "Bad_Name"}, "DNS-1123"),
    ({"image": ""}, "image must be set"),
    ({"nproc_per_node": 8, "gpus_per_node": 4}, "gpus_per_node=4 must equal nproc_per_node=8"),
])
def test_spec_rejected_before_building(kwargs, message):
    base = dict(name="ok", image="img", run_config={})
    base.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        build_manifests(PyTorchJobSpec(**base))


class _FakeK8s:
    def __init__(self, states):
        self.created, self.states = [], list(states)

    def create_namespaced_config_map(self, ns, body):
        self.created.append(("ConfigMap", ns, body["metadata"]["name"]))

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self.created.append((body["kind"], ns, body["metadata"]["name"]))

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        state = self.states.pop(0)
        return {"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": state, "status": "True"}]}}


def test_launcher_submits_and_waits():
    fake = _FakeK8s(["Running", "Running", "Succeeded"])
    launcher = PyTorchJobLauncher(api=fake, core=fake)
    name = launcher.submit(_job())
    assert fake.created == [("ConfigMap", "kubeflow", "gpt-test-config"), ("PyTorchJob", "kubeflow", "gpt-test")]
    assert launcher.wait(name, "kubeflow", poll_s=0) == "Succeeded"


def test_kustomize_base_config_fits_the_job():
    """The base's run config loads, and its layout fits the base job's 2 x 8 processes."""
    from mtnlg.config import load_config
    from mtnlg.parallel.dims import ParallelDims
    from mtnlg.train.config import TrainRunConfig

    base = ROOT / "manifests" / "base"
    cfg = load_config(TrainRunConfig, base / "config.yaml")
    job = yaml.safe_load((base / "pytorchjob.yaml").read_text())
    reps = job["spec"]["pytorchReplicaSpecs"]
    world = (reps["Master"]["replicas"] + reps["Worker"]["replicas"]) * int(job["spec"]["nprocPerNode"])
    dims = ParallelDims.build(cfg.parallel, world, cfg.model)
    assert dims.world_size == 16
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    for f in kust["resources"] + kust["configMapGenerator"][0]["files"]:
        assert (base / f).exists(), f


def test_cli_writes_a_valid_job(tmp_path, schema):
    from mtnlg.cli import main

    out = tmp_path / "job.yaml"
    rc = main(["pytorchjob", "--name", "gpt", "--nodes", "2", "--nproc-per-node", "4", "--gpus-per-node", "4",
               "--recipe", "debug", "data.path=gs://b/t", "output=gs://b/r", "-o", str(out)])
    assert rc == 0
    cm, job = list(yaml.safe_load_all(out.read_text()))
    validate_pytorchjob(job, schema)
    assert yaml.safe_load(cm["data"]["config.yaml"])["parallel"]["tp"] == 2
    # debug's tp=2 cannot fit 3 processes: refused before anything is written.
    assert main(["pytorchjob", "--name", "gpt", "--nodes", "3", "--recipe", "debug", "data.path=x", "output=y",
                 "-o", str(tmp_path / "bad.yaml")]) == 2
    assert not (tmp_path / "bad.yaml").exists()
