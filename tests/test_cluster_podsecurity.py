"""Pod Security: every pod mtnlg creates meets the restricted Pod Security Standard (the
job's nodes as their operator makes them from our template and the runtime's, the
InferenceService's predictor as KServe makes it from ours and the runtime's), each rule of
the standard refuses what it should, and an option that needs more names the level."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import yaml

from mtnlg.cluster import podsecurity
from mtnlg.cluster.jobs import BACKENDS, ClusterJobConfig, build_job, pod_security_level, pod_templates
from mtnlg.cluster.podsecurity import container_security_context, pod_security_context
from mtnlg.cluster.serving import DeployConfig, inference_service
from mtnlg.config import ConfigError, load_config
from mtnlg.train.config import TrainRunConfig, recipe

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
TORCH_RUNTIME = SCHEMAS / "torch_distributed_runtime.yaml"
HF_RUNTIME = SCHEMAS / "kserve-huggingfaceserver-runtime.yaml"


def run_config(*overrides: str) -> TrainRunConfig:
    return load_config(TrainRunConfig, None, ["data.path=gs://b/tokens", "output=gs://b/run",
                                              "train.micro_batch_size=1", "train.global_batch_size=64", *overrides],
                       base=recipe("debug"))


def merge_containers(base: list[dict], patch: list[dict]) -> list[dict]:
    """Containers merged by name, as a strategic merge patch (and Trainer's patches, and
    KServe's model over its runtime's container) merge them: the patch's fields win."""
    out = [copy.deepcopy(c) for c in base]
    for p in patch:
        mine = next((c for c in out if c["name"] == p["name"]), None)
        if mine is None:
            out.append(copy.deepcopy(p))
            continue
        for key, value in p.items():
            mine[key] = {**mine.get(key, {}), **value} if isinstance(value, dict) else copy.deepcopy(value)
    return out


def node_pod(job: dict) -> dict:
    """The pod spec a node of ``job`` runs with: a PyTorchJob's template as is; a TrainJob's
    runtime pod template (torch-distributed's) with our runtime patch over it."""
    template = pod_templates(job)[-1]
    if job["kind"] == "PyTorchJob":
        return template["spec"]
    runtime = yaml.safe_load(TORCH_RUNTIME.read_text())["spec"]["template"]["spec"]["replicatedJobs"][0]
    base = runtime["template"]["spec"]["template"]["spec"]
    spec = {**copy.deepcopy(base), **{k: v for k, v in template["spec"].items() if k != "containers"}}
    spec["containers"] = merge_containers(base["containers"], template["spec"]["containers"])
    return spec


@pytest.mark.skipif(not TORCH_RUNTIME.exists(), reason="../shared/schemas has no torch-distributed runtime")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nodes, gpus, extra", [(1, 0, {}), (2, 8, {}), (2, 8, {"volume_claim": "shared"}),
                                                (2, 8, {"nccl_socket_ifname": "eth0", "queue_name": "gpu"})])
def test_job_pods_meet_the_restricted_standard(backend, nodes, gpus, extra):
    spec = ClusterJobConfig(name="gpt", backend=backend, nodes=nodes, gpus_per_node=gpus, **extra)
    job = build_job(spec, run_config(f"parallel.tp={1 if spec.world_size == 1 else 2}"))
    pod = node_pod(job)
    assert podsecurity.pod_security_level(pod) == ("restricted", [])
    assert pod_security_level(job) == ("restricted", [])
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                                       "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


@pytest.mark.skipif(not HF_RUNTIME.exists(), reason="../shared/schemas has no kserve-huggingfaceserver runtime")
def test_the_predictor_meets_the_restricted_standard():
    runtime = yaml.safe_load(HF_RUNTIME.read_text())["spec"]
    for gpus in (0, 1):
        isvc = inference_service(DeployConfig(name="gpt", storage_uri="gs://b/m/hf", gpus=gpus))
        predictor = isvc["spec"]["predictor"]
        model = dict(predictor["model"], name="kserve-container")
        pod = {"securityContext": predictor["securityContext"], "hostIPC": runtime["hostIPC"],
               "volumes": runtime["volumes"], "containers": merge_containers(runtime["containers"], [model])}
        assert podsecurity.pod_security_level(pod) == ("restricted", [])
        assert predictor["securityContext"]["runAsUser"] == 1000   # the huggingfaceserver image's user


def restricted_pod() -> dict:
    return {"securityContext": pod_security_context(), "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
            "containers": [{"name": "c", "image": "i", "securityContext": container_security_context()}]}


def _set(path: str, value):
    def change(pod: dict) -> None:
        *parents, last = path.split(".")
        node = pod
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return change


C = "containers.0.securityContext"


@pytest.mark.parametrize("change, level, control, field", [
    # baseline: breaking one needs privileged
    (_set("hostNetwork", True), "privileged", "Host Namespaces", "spec.hostNetwork"),
    (_set("hostPID", True), "privileged", "Host Namespaces", "spec.hostPID"),
    (_set("hostIPC", True), "privileged", "Host Namespaces", "spec.hostIPC"),
    (_set(f"{C}.privileged", True), "privileged", "Privileged Containers",
     "spec.containers[0].securityContext.privileged"),
    (_set(f"{C}.capabilities.add", ["IPC_LOCK"]), "privileged", "Capabilities",
     "spec.containers[0].securityContext.capabilities.add"),
    (_set("volumes.0", {"name": "h", "hostPath": {"path": "/dev/infiniband"}}), "privileged", "HostPath Volumes",
     "spec.volumes[0].hostPath"),
    (_set("containers.0.ports", [{"containerPort": 1, "hostPort": 1}]), "privileged", "Host Ports",
     "spec.containers[0].ports[0].hostPort"),
    (_set(f"{C}.appArmorProfile", {"type": "Unconfined"}), "privileged", "AppArmor",
     "spec.containers[0].securityContext.appArmorProfile.type"),
    (_set("securityContext.seLinuxOptions", {"type": "spc_t"}), "privileged", "SELinux",
     "spec.securityContext.seLinuxOptions.type"),
    (_set(f"{C}.procMount", "Unmasked"), "privileged", "/proc Mount Type",
     "spec.containers[0].securityContext.procMount"),
    (_set("securityContext.seccompProfile", {"type": "Unconfined"}), "privileged", "Seccomp",
     "spec.securityContext.seccompProfile.type"),
    (_set("securityContext.sysctls", [{"name": "net.core.somaxconn", "value": "1024"}]), "privileged", "Sysctls",
     "spec.securityContext.sysctls[0].name"),
    (_set("containers.0.livenessProbe", {"httpGet": {"host": "10.0.0.1", "port": 80}}), "privileged",
     "Host Probes / Lifecycle Hooks", "spec.containers[0].livenessProbe.httpGet.host"),
    (_set(f"{C}.windowsOptions", {"hostProcess": True}), "privileged", "HostProcess",
     "spec.containers[0].securityContext.windowsOptions.hostProcess"),
    # restricted only: breaking one needs baseline
    (_set("volumes.0", {"name": "n", "nfs": {"server": "s", "path": "/"}}), "baseline", "Volume Types",
     "spec.volumes[0]"),
    (_set(f"{C}.allowPrivilegeEscalation", True), "baseline", "Privilege Escalation",
     "spec.containers[0].securityContext.allowPrivilegeEscalation"),
    (_set(f"{C}.runAsNonRoot", False), "baseline", "Running as Non-root",
     "spec.containers[0].securityContext.runAsNonRoot"),
    (_set("securityContext.runAsUser", 0), "baseline", "Running as Non-root user", "spec.securityContext.runAsUser"),
    (_set(f"{C}.capabilities", {"drop": ["NET_RAW"]}), "baseline", "Capabilities",
     "spec.containers[0].securityContext.capabilities.drop"),
    (_set(f"{C}.capabilities.add", ["CHOWN"]), "baseline", "Capabilities",
     "spec.containers[0].securityContext.capabilities.add"),
])
def test_each_rule_of_the_standard(change, level, control, field):
    pod = restricted_pod()
    change(pod)
    got, found = podsecurity.pod_security_level(pod)
    assert got == level
    assert (control, field) in {(v.control, v.field) for v in found}


def test_pod_or_container_level_settings_both_satisfy_the_standard():
    pod = restricted_pod()
    del pod["securityContext"]            # non-root and seccomp on every container instead
    pod["containers"][0]["securityContext"].update(seccompProfile={"type": "RuntimeDefault"})
    assert podsecurity.pod_security_level(pod) == ("restricted", [])
    pod["initContainers"] = [{"name": "init", "image": "i"}]   # an init container is a container too
    assert {v.control for v in podsecurity.pod_security_level(pod)[1]} == {
        "Privilege Escalation", "Running as Non-root", "Seccomp", "Capabilities"}
    added = restricted_pod()
    added["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert podsecurity.pod_security_level(added) == ("restricted", [])


@pytest.fixture
def warnings():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mtnlg.cluster")
    logger.addHandler(handler)
    yield lambda: [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    logger.removeHandler(handler)


def test_options_that_need_more_say_which_level_and_why(warnings):
    rdma = ClusterJobConfig(name="gpt", backend="pytorchjob", nodes=2, gpus_per_node=8, rdma_resource="rdma/ib",
                            namespace="team-a")
    job = build_job(rdma, run_config("parallel.tp=2"))
    level, found = pod_security_level(job)
    assert level == "privileged" and {v.control for v in found} == {"Capabilities"}
    (msg,) = warnings()
    assert msg.startswith("the PyTorchJob's pods need the 'privileged' Pod Security level, not 'restricted' "
                          "(spec.containers[0].securityContext.capabilities.add=['IPC_LOCK'] (Capabilities: only the "
                          "runtime's default set: ")
    assert msg.endswith("kubectl label namespace team-a pod-security.kubernetes.io/enforce=privileged --overwrite")
    host = ClusterJobConfig(name="gpt", backend="pytorchjob", nodes=2, gpus_per_node=8, host_network=True)
    assert pod_security_level(build_job(host, run_config("parallel.tp=2")))[0] == "privileged"
    quiet = ClusterJobConfig(name="gpt", backend="pytorchjob", nodes=2, gpus_per_node=8, rdma_resource="rdma/ib",
                             ipc_lock=False)
    assert pod_security_level(build_job(quiet, run_config("parallel.tp=2"))) == ("restricted", [])
    with pytest.raises(ConfigError, match="host_network: a TrainJob's runtimePatches .* needs the 'privileged' Pod "
                                          "Security level"):
        ClusterJobConfig(name="gpt", backend="trainjob", host_network=True)
