"""Kubeflow Training Operator ``PyTorchJob`` manifests for ``mtnlg train``, validated before submit.

A job is one ConfigMap (the run config, mounted at ``/etc/mtnlg/config.yaml``) and one
``kubeflow.org/v1`` PyTorchJob: a ``Master`` (replica 0) and ``nodes - 1`` ``Worker`` replicas,
each pod running ``nproc_per_node`` processes. The operator injects ``MASTER_ADDR``,
``MASTER_PORT``, ``WORLD_SIZE``, ``RANK`` and the ``PET_*`` variables that ``torchrun`` reads
(``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``...), so the container runs

    torchrun -m mtnlg.train.cli --config /etc/mtnlg/config.yaml key=value ...

and the trainer reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as it does under a local torchrun.

Worked example: ``nodes=2, nproc_per_node=8`` -> ``WORLD_SIZE=16``; with ``parallel.tp=8`` the
tensor-parallel groups are the 8 GPUs of one pod (NVLink), data parallel spans the 2 pods.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtnlg.config import ConfigError
from mtnlg.formats.rundir import RUN_CONFIG

CONFIG_MOUNT = "/etc/mtnlg"
CONTAINER_NAME = "pytorch"  # the operator's default container name; its webhook requires it
DEFAULT_PORT = 23456
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class PyTorchJobSpec:
    """What a user chooses for a cluster run; everything else is derived."""

    name: str
    image: str
    run_config: dict[str, Any]
    namespace: str = "kubeflow"
    nodes: int = field(default=1, metadata={"min": 1})
    nproc_per_node: int = field(default=1, metadata={"min": 1})
    gpus_per_node: int = field(default=0, metadata={"min": 0})
    cpu: str | None = None
    memory: str | None = None
    service_account: str | None = "mtnlg-trainer"
    backoff_limit: int = 3
    env: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    shm_size: str = "16Gi"  # NCCL and DataLoader workers need more /dev/shm than the 64Mi default

    def validate(self) -> None:
        if not _DNS1123.match(self.name) or len(self.name) > 52:
            raise ConfigError(f"job name {self.name!r} must be a DNS-1123 label of at most 52 characters "
                              "(lower-case letters, digits, '-')")
        if not self.image:
            raise ConfigError("image must be set (e.g. ghcr.io/mtnlg/mtnlg-train:0.1.0)")
        if self.nodes < 1 or self.nproc_per_node < 1:
            raise ConfigError(f"nodes={self.nodes} and nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.gpus_per_node and self.gpus_per_node != self.nproc_per_node:
            raise ConfigError(f"gpus_per_node={self.gpus_per_node} must equal nproc_per_node="
                              f"{self.nproc_per_node}: one process drives one GPU")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def _container(spec: PyTorchJobSpec, overrides: list[str]) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = spec.gpus_per_node
    if spec.cpu:
        limits["cpu"] = spec.cpu
    if spec.memory:
        limits["memory"] = spec.memory
    if limits:
        resources = {"limits": limits, "requests": dict(limits)}
    env = [{"name": k, "value": str(v)} for k, v in sorted(spec.env.items())]
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    return {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["torchrun", "-m", "mtnlg.train.cli", "--config", f"{CONFIG_MOUNT}/config.yaml", *overrides],
        "env": env,
        "ports": [{"name": "pytorchjob-port", "containerPort": DEFAULT_PORT, "protocol": "TCP"}],
        "resources": resources,
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _replica(spec: PyTorchJobSpec, replicas: int, config_map: str, overrides: list[str]) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [_container(spec, overrides)],
        "volumes": [{"name": "config", "configMap": {"name": config_map}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
    }
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.gpus_per_node:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"replicas": replicas, "restartPolicy": "OnFailure",
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "mtnlg-train",
                                                 "mtnlg/job": spec.name}},
                         "spec": pod}}


def build_manifests(spec: PyTorchJobSpec, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """The ConfigMap and PyTorchJob for ``spec``; validated (raises ConfigError on any rule)."""
    spec.validate()
    overrides = list(overrides or [])
    labels = {"app.kubernetes.io/name": "mtnlg-train", "app.kubernetes.io/part-of": "mtnlg", "mtnlg/job": spec.name}
    cm_name = f"{spec.name}-config"
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": cm_name, "namespace": spec.namespace, "labels": labels},
        "data": {RUN_CONFIG: yaml.safe_dump(spec.run_config, sort_keys=False)},
    }
    replica_specs = {"Master": _replica(spec, 1, cm_name, overrides)}
    if spec.nodes > 1:
        replica_specs["Worker"] = _replica(spec, spec.nodes - 1, cm_name, overrides)
    job = {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels},
        "spec": {
            "nprocPerNode": str(spec.nproc_per_node),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": spec.backoff_limit},
            "pytorchReplicaSpecs": replica_specs,
        },
    }
    validate_pytorchjob(job)
    return [config_map, job]


def check_webhook_rules(job: dict[str, Any]) -> None:
    """The Training Operator's admission-webhook rules, which the CRD schema does not hold."""
    name = job.get("metadata", {}).get("name", "")
    if not _DNS1123.match(name or ""):
        raise ConfigError(f"metadata.name {name!r} is not a DNS-1123 label")
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        raise ConfigError("spec.pytorchReplicaSpecs is empty")
    for rtype, rspec in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            raise ConfigError(f"{where}: replica type must be Master or Worker, got {rtype!r}")
        n = rspec.get("replicas", 1)
        if rtype == "Master" and n != 1:
            raise ConfigError(f"{where}.replicas must be 1, got {n}")
        if rtype == "Worker" and n < 1:
            raise ConfigError(f"{where}.replicas must be >= 1, got {n}")
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        named = [c for c in containers if c.get("name") == CONTAINER_NAME]
        if not named:
            raise ConfigError(f"{where}: the pod template needs a container named {CONTAINER_NAME!r}")
        if not named[0].get("image"):
            raise ConfigError(f"{where}: container {CONTAINER_NAME!r} has no image")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in replicas:
            raise ConfigError("spec.elasticPolicy needs a Worker replica spec")
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            raise ConfigError("spec.elasticPolicy.nProcPerNode and spec.nprocPerNode must not both be set")


def load_crd_schema(path: str | Path) -> dict[str, Any]:
    """The openAPIV3Schema of the PyTorchJob CRD (``kubeflow.org_pytorchjobs.yaml``)."""
    crd = yaml.safe_load(Path(path).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def check_schema(job: dict[str, Any], schema: dict[str, Any]) -> None:
    """Validate against the CRD's OpenAPI v3 schema (``x-kubernetes-*`` keys are ignored)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(_strip_k8s_extensions(schema))
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "<root>"
        raise ConfigError(f"PyTorchJob does not match the CRD schema at {where}: {e.message}")


def _strip_k8s_extensions(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strip_k8s_extensions(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        # int-or-string fields (resources, ports) are typed by the extension we dropped.
        return out
    if isinstance(node, list):
        return [_strip_k8s_extensions(v) for v in node]
    return node


def validate_pytorchjob(job: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Webhook rules always; the CRD schema too when given."""
    check_webhook_rules(job)
    if schema is not None:
        check_schema(copy.deepcopy(job), schema)


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(manifests, sort_keys=False)


class PyTorchJobLauncher:
    """Submits manifests with the Kubernetes API and waits for the job to finish.

    ``api`` is a ``kubernetes.client.CustomObjectsApi``-like object and ``core`` a
    ``CoreV1Api``-like one (in-cluster config by default, e.g. from a pipeline step whose
    service account may create PyTorchJobs: see manifests/base/rbac.yaml).
    """

    GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"

    def __init__(self, api: Any = None, core: Any = None):
        if api is None or core is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api = api or client.CustomObjectsApi()
            core = core or client.CoreV1Api()
        self.api, self.core = api, core

    def submit(self, manifests: list[dict[str, Any]]) -> str:
        job = None
        for m in manifests:
            ns = m["metadata"]["namespace"]
            if m["kind"] == "ConfigMap":
                self.core.create_namespaced_config_map(ns, m)
            elif m["kind"] == "PyTorchJob":
                validate_pytorchjob(m)
                self.api.create_namespaced_custom_object(self.GROUP, self.VERSION, ns, self.PLURAL, m)
                job = m
        if job is None:
            raise ConfigError("no PyTorchJob among the manifests")
        return job["metadata"]["name"]

    def status(self, name: str, namespace: str) -> str:
        """``Succeeded``, ``Failed``, or the newest condition type (``Created``, ``Running``...)."""
        obj = self.api.get_namespaced_custom_object(self.GROUP, self.VERSION, namespace, self.PLURAL, name)
        conds = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
        for final in ("Succeeded", "Failed"):
            if any(c.get("type") == final for c in conds):
                return final
        return conds[-1]["type"] if conds else "Pending"

    def wait(self, name: str, namespace: str, poll_s: float = 30.0, timeout_s: float | None = None) -> str:
        import time

        from mtnlg.progress import get_logger

        log = get_logger("mtnlg.cluster")
        start, last = time.monotonic(), None
        while True:
            state = self.status(name, namespace)
            if state != last:
                log.info("PyTorchJob %s/%s: %s (%.0fs)", namespace, name, state, time.monotonic() - start)
                last = state
            if state in ("Succeeded", "Failed"):
                return state
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise TimeoutError(f"PyTorchJob {namespace}/{name} still {state} after {timeout_s:.0f}s")
            time.sleep(poll_s)
