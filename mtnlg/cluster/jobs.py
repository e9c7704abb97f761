"""The Kubernetes object a cluster training run is: a Kubeflow Trainer ``TrainJob`` or a
Training Operator ``PyTorchJob``, built from a :class:`ClusterJobConfig` and the run's
:class:`~mtnlg.train.config.TrainRunConfig`, checked before anything reaches a cluster.

Both backends run the same container command on every node::

    torchrun -m mtnlg.train.cli --config-from-env MTNLG_RUN_CONFIG

``torchrun`` takes its node count, node rank, processes per node and rendezvous address from
the ``PET_*`` variables the operator injects (Trainer v2's torch runtime: ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``; the
PyTorchJob operator the same plus ``MASTER_ADDR``/``RANK``/``WORLD_SIZE``); the fully
resolved run config travels in the pod spec as the ``MTNLG_RUN_CONFIG`` variable, so there
is no ConfigMap to create, clean up or leak, and what runs is exactly what was validated.

Worked example: ``nodes=2, gpus_per_node=8`` -> 16 processes; with ``parallel.tp=8`` each
tensor-parallel group is the 8 GPUs of one node (NVLink) and data parallelism spans nodes.

    spec = ClusterJobConfig(name="gpt-1b3", backend="trainjob", nodes=2, gpus_per_node=8)
    job = build_job(spec, run_config)          # a dict: TrainJob trainer.kubeflow.org/v1alpha1
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from mtnlg import storage
from mtnlg.config import Config, ConfigError, dump_yaml
from mtnlg.images import TRAIN_IMAGE

BACKENDS = ("trainjob", "pytorchjob")
CONFIG_ENV = "MTNLG_RUN_CONFIG"
# What the operators inject; a job that sets them itself is refused (TrainJob's webhook does).
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
                "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", CONFIG_ENV)
COMMAND = ["torchrun", "-m", "mtnlg.train.cli", "--config-from-env", CONFIG_ENV]
JOB_LABEL = "mtnlg.kubeflow.org/job"
RUN_LABEL = "mtnlg.kubeflow.org/run"
PART_OF = {"app.kubernetes.io/name": "mtnlg-train", "app.kubernetes.io/part-of": "mtnlg"}
# Envoy in front of NCCL's ports breaks the rendezvous; batch pods should not get a sidecar.
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}
# Derived names (job_name) keep room for what the operators append to make pod and Service
# names (<job>-node-0-<i>-<5>, <job>-worker-<i>); a name a user gives is checked exactly.
MAX_NAME = 40
PYTORCHJOB_PORT = 23456


PYTORCHJOB_CONTAINER = "pytorch"   # the Training Operator's default; its webhook requires it
TRAINJOB_CONTAINER = "node"        # the torch-distributed runtime's container


@dataclass(frozen=True)
class JobKind:
    """Where a backend's objects live in the Kubernetes API."""

    backend: str
    group: str
    version: str
    plural: str
    kind: str
    # pod labels the operator sets: the job's name, and the marker of node 0
    pod_job_label: str
    node0_label: tuple[str, str]
    container: str  # the training container (others, e.g. an injected sidecar, may sit beside it)


KINDS = {
    "trainjob": JobKind("trainjob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob",
                        "jobset.sigs.k8s.io/jobset-name", ("batch.kubernetes.io/job-completion-index", "0"),
                        TRAINJOB_CONTAINER),
    "pytorchjob": JobKind("pytorchjob", "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob",
                          "training.kubeflow.org/job-name", ("training.kubeflow.org/replica-type", "master"),
                          PYTORCHJOB_CONTAINER),
}


@dataclass
class ClusterJobConfig(Config):
    """How a training run is laid out on a cluster; the run itself is the TrainRunConfig."""

    # job name: an RFC 1035 label short enough for the pods' names ("" = derived from the
    # pipeline run and task: job_name())
    name: str = ""
    namespace: str = "kubeflow"
    backend: str = field(default="trainjob", metadata={"choices": BACKENDS})
    # trainer image ("" = this package's mtnlg-train image)
    image: str = ""
    nodes: int = field(default=1, metadata={"min": 1})
    # GPUs per node; 0 = a CPU job
    gpus_per_node: int = field(default=0, metadata={"min": 0})
    # processes per node; 0 = one per GPU (one on a CPU node)
    nproc_per_node: int = field(default=0, metadata={"min": 0})
    cpu: str = ""        # per node, e.g. "32"; "" = no request
    memory: str = ""     # per node, e.g. "512Gi"
    shm_size: str = "16Gi"  # /dev/shm (NCCL, loader workers); the container default is 64Mi
    node_selector: dict[str, str] = field(default_factory=dict)
    # extra tolerations; GPU jobs always tolerate the nvidia.com/gpu taint
    tolerations: list[dict[str, str]] = field(default_factory=list)
    # TrainJob: the ClusterTrainingRuntime to run on
    runtime: str = "torch-distributed"
    # job pods' ServiceAccount: one that mounts no API token (manifests/base/serviceaccounts.yaml)
    service_account: str = "mtnlg-trainer"
    # the operator fails the job after this many seconds (0 = no deadline)
    active_deadline_s: int = field(default=0, metadata={"min": 0})
    # time between SIGTERM and SIGKILL: the trainer finishes its step and checkpoints
    termination_grace_s: int = field(default=600, metadata={"min": 1})
    # PyTorchJob: pod restarts before the job fails (the trainer resumes from its checkpoint)
    backoff_limit: int = field(default=3, metadata={"min": 0})
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # a ReadWriteMany PersistentVolumeClaim mounted on every node at volume_mount ("" = none)
    volume_claim: str = ""
    volume_mount: str = "/mnt/mtnlg"

    def validate(self) -> None:
        from mtnlg.cluster.admission import check_name

        if self.name:  # the name rules the cluster applies, and room for the pods' names
            check_name(KINDS[self.backend].kind, self.name, nodes=self.nodes, namespace=self.namespace)
        if self.gpus_per_node and self.nproc_per_node and self.nproc_per_node != self.gpus_per_node:
            raise ConfigError(f"nproc_per_node={self.nproc_per_node} must equal gpus_per_node="
                              f"{self.gpus_per_node}: one process drives one GPU")
        reserved = sorted(set(self.env) & set(RESERVED_ENV))
        if reserved:
            raise ConfigError(f"env: {reserved[0]} is set by the operator (or carries the run config); "
                              "remove it")
        if not self.volume_mount.startswith("/"):
            raise ConfigError(f"volume_mount: expected an absolute path, got {self.volume_mount!r}")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def kind(self) -> JobKind:
        return KINDS[self.backend]


def job_name(run_id: str, task: str, prefix: str = "mtnlg") -> str:
    """A job name that is the same for every attempt of one pipeline task (so a retried
    step finds the job it created) and differs between runs."""
    digest = hashlib.sha256(f"{run_id}/{task}".encode()).hexdigest()[:10]
    head = "".join(c if c.isalnum() else "-" for c in f"{prefix}-{task}".lower()).strip("-")
    return f"{head[:MAX_NAME - 11]}-{digest}".strip("-")


def reachable(path: str, spec: ClusterJobConfig) -> bool:
    """Whether the job's pods can reach ``path``: object storage, or the shared volume."""
    return storage.is_remote(path) or bool(
        spec.volume_claim and path.startswith(spec.volume_mount.rstrip("/") + "/"))


def check_reachable(run_config, spec: ClusterJobConfig) -> None:
    """The job's pods must reach the data and the run directory: object storage (gs://,
    s3://) or the shared volume. A path local to the launcher is named, with the fix."""
    for key, path in (("data.path", run_config.data.path), ("output", run_config.output)):
        if not reachable(str(path), spec):
            raise ConfigError(
                f"{key}={path!r} is not reachable from the job's pods: use a gs:// or s3:// location, or "
                f"mount a ReadWriteMany volume on every node (volume_claim=CLAIM, volume_mount={spec.volume_mount}) "
                f"and put it under {spec.volume_mount}/")


def _resources(spec: ClusterJobConfig) -> dict[str, Any]:
    limits: dict[str, Any] = {}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = spec.gpus_per_node
    if spec.cpu:
        limits["cpu"] = spec.cpu
    if spec.memory:
        limits["memory"] = spec.memory
    return {"limits": limits, "requests": dict(limits)} if limits else {}


def _env(spec: ClusterJobConfig, run_config) -> list[dict[str, str]]:
    env = [{"name": k, "value": str(v)} for k, v in sorted(spec.env.items())]
    return env + [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": CONFIG_ENV, "value": dump_yaml(run_config)}]


def _tolerations(spec: ClusterJobConfig) -> list[dict[str, str]]:
    out = [dict(t) for t in spec.tolerations]
    if spec.gpus_per_node and not any(t.get("key") == "nvidia.com/gpu" for t in out):
        out.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    return out


def _volumes(spec: ClusterJobConfig) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if spec.volume_claim:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": spec.volume_claim}})
        mounts.append({"name": "shared", "mountPath": spec.volume_mount})
    return volumes, mounts


def _pod_spec_extras(spec: ClusterJobConfig) -> dict[str, Any]:
    """What both backends set on every pod beside the container."""
    out: dict[str, Any] = {"terminationGracePeriodSeconds": spec.termination_grace_s}
    if spec.service_account:
        out["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    tolerations = _tolerations(spec)
    if tolerations:
        out["tolerations"] = tolerations
    return out


def _labels(spec: ClusterJobConfig) -> dict[str, str]:
    return {**PART_OF, **spec.labels, JOB_LABEL: spec.name}


def _pytorchjob(spec: ClusterJobConfig, run_config) -> dict[str, Any]:
    volumes, mounts = _volumes(spec)
    container = {
        "name": PYTORCHJOB_CONTAINER, "image": spec.image or TRAIN_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": list(COMMAND), "env": _env(spec, run_config),
        "ports": [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}],
        "resources": _resources(spec), "volumeMounts": mounts,
    }

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": _labels(spec), "annotations": dict(POD_ANNOTATIONS)},
                             "spec": {"containers": [dict(container)], "volumes": volumes,
                                      **_pod_spec_extras(spec)}}}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": spec.backoff_limit}
    if spec.active_deadline_s:
        run_policy["activeDeadlineSeconds"] = spec.active_deadline_s
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
            "spec": {"nprocPerNode": str(spec.procs_per_node), "runPolicy": run_policy,
                     "pytorchReplicaSpecs": replicas}}


def _trainjob(spec: ClusterJobConfig, run_config) -> dict[str, Any]:
    volumes, mounts = _volumes(spec)
    trainer: dict[str, Any] = {"image": spec.image or TRAIN_IMAGE, "command": list(COMMAND),
                               "env": _env(spec, run_config), "numNodes": spec.nodes,
                               "numProcPerNode": spec.procs_per_node}
    resources = _resources(spec)
    if resources:
        trainer["resourcesPerNode"] = resources
    pod = {"metadata": {"labels": _labels(spec), "annotations": dict(POD_ANNOTATIONS)},
           "spec": {**_pod_spec_extras(spec), "volumes": volumes,
                    "containers": [{"name": TRAINJOB_CONTAINER, "volumeMounts": mounts}]}}
    patch = {"manager": "mtnlg.kubeflow.org/launcher",
             "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                 {"name": "node", "template": {"spec": {"template": pod}}}]}}}}
    job_spec: dict[str, Any] = {
        "runtimeRef": {"name": spec.runtime, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"},
        "trainer": trainer, "runtimePatches": [patch]}
    if spec.active_deadline_s:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_s
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _labels(spec)},
            "spec": job_spec}


def build_job(spec: ClusterJobConfig, run_config) -> dict[str, Any]:
    """The job object for ``spec`` running ``run_config`` (a ``TrainRunConfig``). Raises
    ``ConfigError`` before anything is created: the layout must fit ``nodes x procs``, the
    pods must reach the data and the run directory, and the object must pass admission
    (:func:`check_webhook_rules`)."""
    if not spec.name:
        raise ConfigError("name: the job needs a name (an RFC 1035 label)")
    run_config.check_layout(spec.world_size)
    check_reachable(run_config, spec)
    job = _trainjob(spec, run_config) if spec.backend == "trainjob" else _pytorchjob(spec, run_config)
    check_webhook_rules(job)
    return job


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return ((pod_template or {}).get("spec") or {}).get("containers") or []


def check_webhook_rules(job: dict[str, Any]) -> None:
    """What the cluster checks when the job is created, without its CRD at hand: ObjectMeta,
    the TrainJob CRD's name rules, the operator's validating webhook, and the names of the
    pods and Services the operator will create (``admission.admit``; ``AdmissionError``)."""
    from mtnlg.cluster.admission import admit

    admit(job)


def run_config_of(job: dict[str, Any]) -> str:
    """The run config YAML a job carries (what its pods will train)."""
    if job.get("kind") == "TrainJob":
        env = job["spec"]["trainer"]["env"]
    else:
        env = _containers(job["spec"]["pytorchReplicaSpecs"]["Master"]["template"])[0]["env"]
    return next(e["value"] for e in env if e["name"] == CONFIG_ENV)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def with_owner(job: dict[str, Any], owner: dict[str, str] | None) -> dict[str, Any]:
    """``job`` owned by ``owner`` (``{"apiVersion", "kind", "name", "uid"}``: the launcher's
    pod), so that deleting the pipeline run's pods garbage-collects the job."""
    if not owner:
        return job
    job = dict(job, metadata=dict(job["metadata"]))
    job["metadata"]["ownerReferences"] = [{**owner, "blockOwnerDeletion": False, "controller": False}]
    return job
