"""The cluster job objects: both backends built from one spec, checked strictly against the
real CRD schemas (unknown fields rejected) and the operators' webhook rules, before launch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mtnlg.cluster.jobs import (BACKENDS, CONFIG_ENV, JOB_LABEL, PRIORITY_LABEL, QUEUE_LABEL, ClusterJobConfig,
                                build_job, check_webhook_rules, job_name, pod_templates, run_config_of)
from mtnlg.cluster.schema import load_crd_schema, strict_schema, validate_object
from mtnlg.config import ConfigError, load_config
from mtnlg.train.config import TrainRunConfig, recipe

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT.parent / "shared" / "schemas"
CRDS = {"trainjob": SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml",
        "pytorchjob": SCHEMAS / "kubeflow.org_pytorchjobs.yaml"}


def schema(backend: str) -> dict:
    if not CRDS[backend].exists():
        pytest.skip(f"CRD schema not found at {CRDS[backend]}")
    return load_crd_schema(CRDS[backend])


def run_config(*overrides: str, recipe_name: str = "debug") -> TrainRunConfig:
    return load_config(TrainRunConfig, None, ["data.path=gs://b/tokens", "output=s3://b/runs/x",
                                              "train.global_batch_size=64", "train.micro_batch_size=1", *overrides],
                       base=recipe(recipe_name))


def job(backend: str, nodes: int = 2, gpus: int = 8, **kw) -> dict:
    spec = ClusterJobConfig(name="gpt-test", backend=backend, nodes=nodes, gpus_per_node=gpus, memory="64Gi", **kw)
    return build_job(spec, run_config(f"parallel.tp={2 if spec.world_size % 2 == 0 else 1}"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nodes, gpus", [(1, 0), (2, 8), (4, 4)])
def test_generated_jobs_pass_the_strict_crd_schema(backend, nodes, gpus):
    validate_object(job(backend, nodes, gpus), schema(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_misspelt_field_is_rejected_not_pruned(backend):
    s = schema(backend)
    j = copy.deepcopy(job(backend))
    if backend == "pytorchjob":
        j["spec"]["nprocPerNod"] = j["spec"].pop("nprocPerNode")
        where = "spec"
    else:
        j["spec"]["trainer"]["numProcsPerNode"] = 8
        where = "spec.trainer"
    with pytest.raises(ConfigError, match=rf"at {where}: Additional properties are not allowed"):
        validate_object(j, s)
    j = copy.deepcopy(job(backend))
    j["metadata"]["lables"] = {"a": "b"}
    with pytest.raises(ConfigError, match="metadata: unknown field 'lables'"):
        validate_object(j, s)


def test_strict_schema_keeps_int_or_string_and_open_maps():
    s = strict_schema({"type": "object", "properties": {
        "q": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "m": {"type": "object", "additionalProperties": {"type": "string"}}}})
    assert s["additionalProperties"] is False and "additionalProperties" not in s["properties"]["free"]
    assert s["properties"]["m"]["additionalProperties"] == {"type": "string"}


def test_trainjob_shape():
    j = job("trainjob", nodes=2, gpus=8)
    assert j["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and j["kind"] == "TrainJob"
    t = j["spec"]["trainer"]
    assert (t["numNodes"], t["numProcPerNode"]) == (2, 8)
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert t["command"][:3] == ["torchrun", "-m", "mtnlg.train.cli"]
    assert j["spec"]["runtimeRef"]["name"] == "torch-distributed"
    names = {e["name"] for e in t["env"]}
    assert not names & {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    pod = j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pod["metadata"]["labels"][JOB_LABEL] == "gpt-test"
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 300
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert pod["spec"]["containers"][0]["name"] == "node"


def test_pytorchjob_shape():
    j = job("pytorchjob", nodes=4, gpus=4)
    reps = j["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 3 and j["spec"]["nprocPerNode"] == "4"
    c = reps["Worker"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert reps["Master"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert list(job("pytorchjob", nodes=1, gpus=0)["spec"]["pytorchReplicaSpecs"]) == ["Master"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_run_config_travels_whole_in_the_job(backend):
    cfg = run_config("parallel.tp=4", "train.steps=77")
    j = build_job(ClusterJobConfig(name="gpt", backend=backend, nodes=2, gpus_per_node=4), cfg)
    again = load_config(TrainRunConfig, base=yaml.safe_load(run_config_of(j)))
    assert again == cfg
    assert "configMap" not in yaml.safe_dump(j)  # no ConfigMap to create, or leak


@pytest.mark.parametrize("kw, overrides, message", [
    ({"name": "Bad_Name"}, [], "RFC 1123 subdomain"),
    ({"name": "x" * 49}, [], r"pod name would be \"x{49}-node-0-0-abcde\" \(64 characters\)"),
    ({"nproc_per_node": 8, "gpus_per_node": 4}, [], "nproc_per_node=8 must equal gpus_per_node=4"),
    ({"env": {"PET_NNODES": "2"}}, [], "PET_NNODES is set by the operator"),
    ({"gpus_per_node": 4, "nodes": 1}, ["parallel.tp=8"], "not divisible by parallel.tp"),
    ({}, ["output=/home/me/run"], "output='/home/me/run' is not reachable from the job's pods"),
    ({"volume_claim": "shared"}, ["output=/mnt/mtnlg/run"], None),
    ({}, ["data.path=runs/tokens"], "data.path='runs/tokens' is not reachable"),
])
def test_bad_specs_are_refused_before_anything_is_built(kw, overrides, message):
    base = {"name": "gpt", "backend": "trainjob", "gpus_per_node": 2, "nodes": 1, **kw}
    if message is None:
        assert build_job(ClusterJobConfig(**base), run_config(*overrides))["kind"] == "TrainJob"
        return
    with pytest.raises(ConfigError, match=message):
        build_job(ClusterJobConfig(**base), run_config(*overrides))


def test_webhook_rules_of_both_operators():
    j = copy.deepcopy(job("pytorchjob"))
    j["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    with pytest.raises(ConfigError, match=r"spec.pytorchReplicaSpecs\[Master\].replicas: Forbidden: must be 1"):
        check_webhook_rules(j)
    j = copy.deepcopy(job("pytorchjob"))
    j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "main"
    with pytest.raises(ConfigError, match="must have at least one container with name pytorch"):
        check_webhook_rules(j)
    j = copy.deepcopy(job("trainjob"))
    j["spec"]["trainer"]["env"].append({"name": "PET_MASTER_PORT", "value": "1"})
    with pytest.raises(ConfigError, match=r"must not have reserved envs, invalid envs configured: \[PET_MASTER_PORT\]"):
        check_webhook_rules(j)


def test_job_names_are_deterministic_per_run_and_task():
    a, b = job_name("run-1", "train"), job_name("run-1", "train")
    assert a == b and a != job_name("run-2", "train") and len(a) <= 40
    ClusterJobConfig(name=job_name("8b0e3c1a-" * 6, "train-with-a-long-task-name"))  # always a valid name


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_writes_a_valid_job_and_refuses_a_bad_layout(tmp_path, backend):
    from mtnlg.cli import main

    out = tmp_path / "job.yaml"
    args = ["job", "--backend", backend, "--name", "gpt", "--nodes", "2", "--gpus-per-node", "4",
            "--recipe", "debug", "data.path=gs://b/t", "output=gs://b/r", "train.micro_batch_size=1",
            "-o", str(out), "--job", "shm_size=32Gi"]
    if CRDS[backend].exists():
        args += ["--schema-dir", str(SCHEMAS)]
    assert main(args) == 0
    (j,) = list(yaml.safe_load_all(out.read_text()))
    assert j["kind"] == {"trainjob": "TrainJob", "pytorchjob": "PyTorchJob"}[backend]
    assert yaml.safe_load(run_config_of(j))["parallel"]["tp"] == 2 and "32Gi" in out.read_text()
    assert CONFIG_ENV in out.read_text()
    # debug's tp=2 cannot fit 3 processes: refused before anything is written.
    assert main(["job", "--backend", backend, "--name", "gpt", "--nodes", "3", "--recipe", "debug",
                 "data.path=gs://b/t", "output=gs://b/r", "-o", str(tmp_path / "bad.yaml")]) == 2
    assert not (tmp_path / "bad.yaml").exists()


def test_the_example_jobs_carry_the_example_run_config_and_it_fits_them():
    cfg = load_config(TrainRunConfig, ROOT / "manifests" / "examples" / "run-config.yaml")
    assert cfg.check_layout(16).world_size == 16                        # 2 nodes x 8 GPUs
    for backend in BACKENDS:
        j = yaml.safe_load((ROOT / "manifests" / "examples" / f"{backend}.yaml").read_text())
        assert load_config(TrainRunConfig, base=yaml.safe_load(run_config_of(j))) == cfg


def test_a_shared_volume_stages_what_the_pods_cannot_reach(tmp_path, monkeypatch):
    """Pipeline root on the launcher's local mount, a ReadWriteMany PVC at /mnt/...: the
    tokens are copied onto the volume, the job trains there, the run comes back."""
    import json

    import mtnlg.cluster.launcher as launcher_mod
    from mtnlg.steps import train_job_step

    tokens, output, mount = tmp_path / "artifacts" / "tokens", tmp_path / "artifacts" / "checkpoint", tmp_path / "mnt"
    tokens.mkdir(parents=True)
    (tokens / "train.idx").write_bytes(b"idx")
    seen = {}

    class FakeLauncher:  # the job "runs": it writes what a trainer writes into the run directory
        def __init__(self, backend):
            seen["backend"] = backend

        def run(self, job, timeout_s=None, cleanup="on-success"):
            cfg = yaml.safe_load(run_config_of(job))
            seen["data"], seen["output"] = cfg["data"]["path"], cfg["output"]
            assert (Path(cfg["data"]["path"]) / "train.idx").read_bytes() == b"idx"
            Path(cfg["output"]).mkdir(parents=True)
            (Path(cfg["output"]) / "summary.json").write_text(json.dumps({"steps": 3}))

    monkeypatch.setattr(launcher_mod, "JobLauncher", FakeLauncher)
    job = ClusterJobConfig(backend="pytorchjob", nodes=2, gpus_per_node=0, volume_claim="shared",
                           volume_mount=str(mount))
    result = train_job_step(str(tokens), str(output), run_config("parallel.tp=2"), job=job, run_id="r1")
    stage = mount / "mtnlg" / job_name("r1", "train")
    assert seen == {"backend": "pytorchjob", "data": str(stage / "tokens"), "output": str(stage / "run")}
    assert result.stats == {"steps": 3} and json.loads((output / "summary.json").read_text()) == {"steps": 3}
    # without a volume the same locations are refused, naming the fix
    with pytest.raises(ConfigError, match="not reachable from the job's pods"):
        train_job_step(str(tokens), str(output), run_config("parallel.tp=2"),
                       job=ClusterJobConfig(backend="pytorchjob", nodes=2), run_id="r1")


# ------------------------------------------------------------------ resources, queues, networking


def resources(j: dict) -> dict:
    if j["kind"] == "TrainJob":
        return j["spec"]["trainer"]["resourcesPerNode"]
    return pod_templates(j)[0]["spec"]["containers"][0]["resources"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gpus, kw, want", [
    (8, {}, {"nvidia.com/gpu": 8, "cpu": "64", "memory": "512Gi", "ephemeral-storage": "100Gi"}),
    (2, {}, {"nvidia.com/gpu": 2, "cpu": "16", "memory": "128Gi", "ephemeral-storage": "100Gi"}),
    (0, {}, {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "20Gi"}),
    (8, {"cpu": "90", "memory": "1000Gi", "ephemeral_storage": "1Ti", "rdma_resource": "vpc.amazonaws.com/efa",
         "rdma_per_node": 4},
     {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 4, "cpu": "90", "memory": "1000Gi", "ephemeral-storage": "1Ti"}),
])
def test_every_node_asks_for_cpu_memory_and_disk_by_its_gpus(backend, gpus, kw, want):
    spec = ClusterJobConfig(name="gpt", backend=backend, nodes=2, gpus_per_node=gpus, **kw)
    j = build_job(spec, run_config(f"parallel.tp={2 if gpus else 1}"))
    assert resources(j) == {"limits": want, "requests": want}         # Guaranteed QoS: requests = limits
    validate_object(j, schema(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kueue_queue_and_priority_label_the_job_not_its_pods(backend):
    spec = ClusterJobConfig(name="gpt", backend=backend, nodes=2, gpus_per_node=8, queue_name="team-a-gpus",
                            priority_class="production")
    j = build_job(spec, run_config("parallel.tp=2"))
    assert {k: v for k, v in j["metadata"]["labels"].items() if k.startswith("kueue.x-k8s.io/")} == {
        QUEUE_LABEL: "team-a-gpus", PRIORITY_LABEL: "production"}
    assert all(QUEUE_LABEL not in t["metadata"]["labels"] for t in pod_templates(j))
    assert "suspend" not in yaml.safe_dump(j)                           # Kueue's webhook suspends it, not us
    validate_object(j, schema(backend))
    plain = build_job(ClusterJobConfig(name="gpt", backend=backend, nodes=2, gpus_per_node=8), run_config())
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])


@pytest.mark.parametrize("kw, message", [
    ({"queue_name": "Team_A"}, "queue_name: 'Team_A' is not valid as a LocalQueue's name and the value of the label "
                               "kueue.x-k8s.io/queue-name: a lowercase RFC 1123 subdomain must consist of"),
    ({"queue_name": "q" * 64}, "queue_name: 'q{64}' is not valid .*: must be no more than 63 characters"),
    ({"priority_class": "high priority"}, "priority_class: 'high priority' is not valid as a WorkloadPriorityClass's"),
    ({"labels": {QUEUE_LABEL: "a"}}, "labels: kueue.x-k8s.io/queue-name is set from queue_name; use queue_name=a"),
    ({"pod_priority_class": "high"}, "pod_priority_class: a TrainJob's runtimePatches .* cannot set priorityClassName"),
    ({"memory": "16GB"}, "memory: '16GB' is not a Kubernetes quantity"),
    ({"nccl_env": {"PATH": "/x"}}, "nccl_env: 'PATH' is not an NCCL, libfabric or UCX variable"),
    ({"nccl_env": {"NCCL_DEBUG": "INFO"}, "env": {"NCCL_DEBUG": "WARN"}}, "nccl_env: NCCL_DEBUG is also set in env"),
    ({"nccl_socket_ifname": "eth 0"}, "nccl_socket_ifname: 'eth 0' is not an interface list"),
    ({"rdma_resource": "ib"}, "rdma_resource: 'ib' is not a resource name .*needs a domain prefix"),
    ({"host_network": True}, "host_network: a TrainJob's runtimePatches"),
])
def test_queue_priority_and_network_settings_are_checked_when_made(kw, message):
    with pytest.raises(ConfigError, match=message):
        ClusterJobConfig(name="gpt", backend="trainjob", nodes=2, gpus_per_node=8, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_networking_options_reach_every_node(backend):
    spec = ClusterJobConfig(name="gpt", backend=backend, nodes=2, gpus_per_node=8, nccl_socket_ifname="^lo,docker",
                            nccl_env={"NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "INFO"}, rdma_resource="rdma/ib",
                            env={"HF_HOME": "/tmp/hf"})
    j = build_job(spec, run_config("parallel.tp=2"))
    env = j["spec"]["trainer"]["env"] if backend == "trainjob" else pod_templates(j)[0]["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env] == ["HF_HOME", "NCCL_DEBUG", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME",
                                        "PYTHONUNBUFFERED", CONFIG_ENV]
    assert {e["name"]: e["value"] for e in env}["NCCL_SOCKET_IFNAME"] == "^lo,docker"
    assert resources(j)["limits"]["rdma/ib"] == 1
    for t in pod_templates(j):
        assert t["spec"]["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    validate_object(j, schema(backend))
    check_webhook_rules(j)
    # the defaults add nothing of this
    plain = build_job(ClusterJobConfig(name="gpt", backend=backend, nodes=2, gpus_per_node=8), run_config())
    assert "NCCL" not in yaml.safe_dump(plain) and "hostNetwork" not in yaml.safe_dump(plain)
    assert "IPC_LOCK" not in yaml.safe_dump(plain)


def test_pytorchjob_host_network_and_pod_priority():
    spec = ClusterJobConfig(name="gpt", backend="pytorchjob", nodes=4, gpus_per_node=8, host_network=True,
                            pod_priority_class="training-high")
    j = build_job(spec, run_config("parallel.tp=2"))
    for t in pod_templates(j):
        assert (t["spec"]["hostNetwork"], t["spec"]["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
        assert t["spec"]["priorityClassName"] == "training-high"
    validate_object(j, schema("pytorchjob"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pipeline_on_kfps_own_store_gives_the_job_its_s3_endpoint_and_keys(backend):
    """With Kubeflow Pipelines' default minio:// root, the job's pods reach the artifacts
    over S3: the endpoint from the step's environment, the keys by reference to the store's
    Secret (never their values in the job), strictly valid against the CRD and admitted."""
    from mtnlg.cluster.admission import admit
    from mtnlg.cluster.jobs import with_kfp_store

    spec = ClusterJobConfig(name="gpt-test", backend=backend, nodes=2, gpus_per_node=8, env={"A": "1"})
    uris = ["minio://mlpipeline/v2/artifacts/mtnlg-gpt/run/tokenize/tokens",
            "minio://mlpipeline/v2/artifacts/mtnlg-gpt/run/train/checkpoint"]
    env = {"AWS_ENDPOINT_URL_S3": "http://minio-service.kubeflow:9000", "AWS_SECRET_ACCESS_KEY": "never-copied"}
    got = with_kfp_store(spec, uris, env)
    assert got.env == {"A": "1", "AWS_ENDPOINT_URL_S3": "http://minio-service.kubeflow:9000"}
    assert got.secret_env == {"AWS_ACCESS_KEY_ID": "mlpipeline-minio-artifact/accesskey",
                              "AWS_SECRET_ACCESS_KEY": "mlpipeline-minio-artifact/secretkey"}
    j = build_job(got, run_config("parallel.tp=2"))
    validate_object(j, schema(backend))
    admit(j, schema(backend))
    container_env = (j["spec"]["trainer"]["env"] if backend == "trainjob" else
                     j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"])
    by_name = {e["name"]: e for e in container_env}
    assert by_name["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {
        "secretKeyRef": {"name": "mlpipeline-minio-artifact", "key": "secretkey"}}}
    assert "never-copied" not in str(j)
    assert with_kfp_store(spec, uris, {**env, "MTNLG_S3_SECRET": "my-store"}).secret_env["AWS_ACCESS_KEY_ID"] == \
        "my-store/accesskey"
    assert with_kfp_store(spec, ["gs://b/tokens", "s3://b/run"], env) is spec  # other stores: as is
    with pytest.raises(ConfigError, match=r"compile with `mtnlg compile --kfp-store-endpoint "
                                          r"http://minio-service.kubeflow:9000`"):
        with_kfp_store(spec, uris, {})
    with pytest.raises(ConfigError, match=r"secret_env: X='nokey': expected SECRET/KEY"):
        ClusterJobConfig(secret_env={"X": "nokey"})
