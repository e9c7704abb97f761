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

Every node's pod asks for its GPUs, CPU, memory and ephemeral storage, requests equal to
limits (the Guaranteed QoS class; defaults scale with the GPUs: :func:`node_resources`), meets
the restricted Pod Security Standard (:mod:`mtnlg.cluster.podsecurity`) unless a networking
option needs more (the build logs which level and why), and the job carries Kueue's labels
when ``queue_name`` / ``priority_class`` are set: Kueue then holds it suspended until its
queue admits it, and the launcher waits (``launcher.job_state``).

Worked example: ``nodes=2, gpus_per_node=8`` -> 16 processes; with ``parallel.tp=8`` each
tensor-parallel group is the 8 GPUs of one node (NVLink) and data parallelism spans nodes.

    spec = ClusterJobConfig(name="gpt-1b3", backend="trainjob", nodes=2, gpus_per_node=8)
    job = build_job(spec, run_config)          # a dict: TrainJob trainer.kubeflow.org/v1alpha1
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from mtnlg import storage
from mtnlg.cluster import podsecurity
from mtnlg.config import Config, ConfigError, dump_yaml
from mtnlg.images import TRAIN_IMAGE
from mtnlg.progress import get_logger

log = get_logger("mtnlg.cluster")

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
# Kueue reads these labels on the job: the LocalQueue it waits in, its WorkloadPriorityClass
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# a Kubernetes resource quantity (apimachinery's resource.Quantity): a number and a suffix
QUANTITY = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
# Per node when not set: GPU nodes sized for 8 x A100/H100 machines (96 to 224 vCPUs, 1 to
# 2 TiB of memory): 8 CPUs and 64Gi per GPU; ephemeral storage for the checkpoint staged for
# upload, the data cache and the compile caches. CPU nodes: a small fixed share.
CPU_PER_GPU, MEMORY_GI_PER_GPU, GPU_NODE_DISK = 8, 64, "100Gi"
CPU_NODE = {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "20Gi"}
# what nccl_env may set: NCCL's own, PyTorch's NCCL settings, libfabric (EFA) and its NCCL plugin, UCX
NCCL_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "FI_", "OFI_NCCL_", "UCX_")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


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
    # per node, requests = limits ("" = 8 per GPU, 64Gi per GPU, 100Gi; CPU nodes 4, 16Gi, 20Gi)
    cpu: str = ""
    memory: str = ""     # /dev/shm (memory-backed) counts against it
    ephemeral_storage: str = ""
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
    # variables taken from Secrets in the job's namespace: NAME -> "SECRET/KEY" (credentials:
    # the pods read them, the job object holds only the reference)
    secret_env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # a ReadWriteMany PersistentVolumeClaim mounted on every node at volume_mount ("" = none)
    volume_claim: str = ""
    volume_mount: str = "/mnt/mtnlg"
    # Kueue: the LocalQueue the job waits in, and its WorkloadPriorityClass ("" = none)
    queue_name: str = ""
    priority_class: str = ""
    # PyTorchJob: the pods' PriorityClass (scheduler preemption; Kueue's priority when
    # priority_class is unset). A TrainJob's runtime patches cannot set it.
    pod_priority_class: str = ""
    # the user the pods run as: the images' (restricted Pod Security: never root)
    run_as_user: int = field(default=podsecurity.IMAGE_USER, metadata={"min": 1})
    # multi-node networking (docs/kubeflow.md): NCCL's interface for its sockets, more NCCL /
    # libfabric settings, RDMA devices per node (e.g. rdma/ib, vpc.amazonaws.com/efa)
    nccl_socket_ifname: str = ""
    nccl_env: dict[str, str] = field(default_factory=dict)
    rdma_resource: str = ""
    rdma_per_node: int = field(default=1, metadata={"min": 1})
    # CAP_IPC_LOCK for RDMA memory registration (None = with an rdma_resource); needs the
    # privileged Pod Security level
    ipc_lock: bool | None = None
    # PyTorchJob: the pods on the node's network (dnsPolicy ClusterFirstWithHostNet); privileged level
    host_network: bool = False

    def validate(self) -> None:
        from mtnlg.cluster.admission import check_name, qualified_name_errors

        if self.name:  # the name rules the cluster applies, and room for the pods' names
            check_name(KINDS[self.backend].kind, self.name, nodes=self.nodes, namespace=self.namespace)
        if self.gpus_per_node and self.nproc_per_node and self.nproc_per_node != self.gpus_per_node:
            raise ConfigError(f"nproc_per_node={self.nproc_per_node} must equal gpus_per_node="
                              f"{self.gpus_per_node}: one process drives one GPU")
        for var, ref in self.secret_env.items():
            secret, _, key = ref.partition("/")
            if not (secret and key) or "/" in key:
                raise ConfigError(f"secret_env: {var}={ref!r}: expected SECRET/KEY (a Secret in the job's namespace "
                                  "and one of its keys)")
            if var in self.env:
                raise ConfigError(f"secret_env: {var} is also set in env; set it once")
        reserved = sorted((set(self.env) | set(self.secret_env)) & set(RESERVED_ENV))
        if reserved:
            raise ConfigError(f"env: {reserved[0]} is set by the operator (or carries the run config); "
                              "remove it")
        if not self.volume_mount.startswith("/"):
            raise ConfigError(f"volume_mount: expected an absolute path, got {self.volume_mount!r}")
        for key in ("cpu", "memory", "ephemeral_storage", "shm_size"):
            value = getattr(self, key)
            if value and not QUANTITY.match(value):
                raise ConfigError(f"{key}: {value!r} is not a Kubernetes quantity (e.g. \"32\", \"500m\", "
                                  "\"512Gi\")")
        _check_object_name("queue_name", self.queue_name,
                           f"a LocalQueue's name and the value of the label {QUEUE_LABEL}")
        _check_object_name("priority_class", self.priority_class,
                           f"a WorkloadPriorityClass's name and the value of the label {PRIORITY_LABEL}")
        _check_object_name("pod_priority_class", self.pod_priority_class, "a PriorityClass's name")
        for key, setting in ((QUEUE_LABEL, "queue_name"), (PRIORITY_LABEL, "priority_class")):
            if key in self.labels:
                raise ConfigError(f"labels: {key} is set from {setting}; use {setting}={self.labels[key]}")
        self._validate_network()
        if self.backend == "trainjob" and self.host_network:
            raise ConfigError(
                "host_network: a TrainJob's runtimePatches (Trainer v2.3) cannot set hostNetwork or dnsPolicy: "
                "run on a ClusterTrainingRuntime whose pod template sets hostNetwork: true and dnsPolicy: "
                "ClusterFirstWithHostNet (runtime=NAME), or use backend=pytorchjob; either way the job's namespace "
                "needs the 'privileged' Pod Security level (baseline forbids the host's network namespace)")
        if self.backend == "trainjob" and self.pod_priority_class:
            raise ConfigError("pod_priority_class: a TrainJob's runtimePatches (Trainer v2.3) cannot set "
                              "priorityClassName: set it in the ClusterTrainingRuntime's pod template, or give Kueue "
                              "a WorkloadPriorityClass with priority_class")
        if self.rdma_resource:
            errors = [] if "/" in self.rdma_resource else ["an extended resource needs a domain prefix"]
            errors += qualified_name_errors(self.rdma_resource)
            if errors:
                raise ConfigError(f"rdma_resource: {self.rdma_resource!r} is not a resource name "
                                  f"(e.g. rdma/ib, vpc.amazonaws.com/efa): {'; '.join(errors)}")

    def _validate_network(self) -> None:
        if self.nccl_socket_ifname and not re.fullmatch(r"[\^=]?[\w.:-]+(,[\w.:-]+)*", self.nccl_socket_ifname):
            raise ConfigError(f"nccl_socket_ifname: {self.nccl_socket_ifname!r} is not an interface list "
                              "(e.g. eth0, ^lo,docker, =eth1)")
        for key in self.nccl_env:
            if not (_ENV_NAME.match(key) and key.startswith(NCCL_ENV_PREFIXES)):
                raise ConfigError(f"nccl_env: {key!r} is not an NCCL, libfabric or UCX variable (names start with "
                                  f"{', '.join(NCCL_ENV_PREFIXES)}); other variables go in env")
            if key in self.env:
                raise ConfigError(f"nccl_env: {key} is also set in env; set it once")
        if self.nccl_socket_ifname and "NCCL_SOCKET_IFNAME" in {**self.env, **self.nccl_env}:
            raise ConfigError("nccl_socket_ifname: NCCL_SOCKET_IFNAME is also set in env or nccl_env; set it once")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def kind(self) -> JobKind:
        return KINDS[self.backend]

    @property
    def capabilities(self) -> list[str]:
        """Capabilities the training container adds to the restricted set (none by default)."""
        lock = self.ipc_lock if self.ipc_lock is not None else bool(self.rdma_resource)
        return ["IPC_LOCK"] if lock else []


def _check_object_name(key: str, value: str, what: str) -> None:
    """``value`` must be an object's name (a DNS-1123 subdomain) that is also a label value."""
    from mtnlg.cluster.admission import dns1123_subdomain_errors, label_value_errors

    errors = list(dict.fromkeys(dns1123_subdomain_errors(value) + label_value_errors(value))) if value else []
    if errors:
        raise ConfigError(f"{key}: {value!r} is not valid as {what}: {'; '.join(errors)}")


def job_name(run_id: str, task: str, prefix: str = "mtnlg") -> str:
    """A job name that is the same for every attempt of one pipeline task (so a retried
    step finds the job it created) and differs between runs."""
    digest = hashlib.sha256(f"{run_id}/{task}".encode()).hexdigest()[:10]
    head = "".join(c if c.isalnum() else "-" for c in f"{prefix}-{task}".lower()).strip("-")
    return f"{head[:MAX_NAME - 11]}-{digest}".strip("-")


# Kubeflow Pipelines' own artifact store (MinIO, or SeaweedFS behind the same Service) and the
# Secret holding its keys in every namespace that runs pipelines
KFP_STORE_SECRET = "mlpipeline-minio-artifact"
KFP_STORE_KEYS = {"AWS_ACCESS_KEY_ID": "accesskey", "AWS_SECRET_ACCESS_KEY": "secretkey"}


def with_kfp_store(spec: ClusterJobConfig, artifact_uris: list[str], environ: dict[str, str]) -> ClusterJobConfig:
    """The job of a pipeline step whose artifacts live in Kubeflow Pipelines' own store
    (``minio://`` URIs): its pods get the store's S3 endpoint (from the step's environment,
    where ``mtnlg compile --kfp-store-endpoint`` puts it) and its keys from the store's
    Secret in their namespace (``MTNLG_S3_SECRET``, default ``mlpipeline-minio-artifact``),
    so they read the tokens and write the run where the step and the later steps find them.
    Without the endpoint, a ``ConfigError`` says what to set. Other URIs: ``spec`` as is."""
    import dataclasses

    if not any(u.startswith("minio://") for u in artifact_uris):
        return spec
    endpoint = storage.s3_endpoint(environ)
    if not endpoint:
        raise ConfigError(
            "the pipeline root is Kubeflow Pipelines' own store (minio://...), which the job's pods cannot reach "
            "through this step's local copies: compile with `mtnlg compile --kfp-store-endpoint "
            "http://minio-service.kubeflow:9000` (every step and the job's pods then use the store over S3 with the "
            f"{KFP_STORE_SECRET} Secret), or run with a gs:// or s3:// pipeline root, or a shared volume "
            "(--volume-claim)")
    secret = environ.get("MTNLG_S3_SECRET") or KFP_STORE_SECRET
    env = {**spec.env, "AWS_ENDPOINT_URL_S3": endpoint}
    secret_env = {**{var: f"{secret}/{key}" for var, key in KFP_STORE_KEYS.items()}, **spec.secret_env}
    return dataclasses.replace(spec, env=env, secret_env=secret_env)


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


def node_resources(spec: ClusterJobConfig) -> dict[str, Any]:
    """What every node asks for: its GPUs, RDMA devices, CPU, memory and ephemeral storage,
    requests equal to limits (defaults scale with the GPUs; see the constants above)."""
    gpus = spec.gpus_per_node
    limits: dict[str, Any] = {}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    if spec.rdma_resource:
        limits[spec.rdma_resource] = spec.rdma_per_node
    limits["cpu"] = spec.cpu or (str(CPU_PER_GPU * gpus) if gpus else CPU_NODE["cpu"])
    limits["memory"] = spec.memory or (f"{MEMORY_GI_PER_GPU * gpus}Gi" if gpus else CPU_NODE["memory"])
    limits["ephemeral-storage"] = spec.ephemeral_storage or (GPU_NODE_DISK if gpus else CPU_NODE["ephemeral-storage"])
    return {"limits": limits, "requests": dict(limits)}


def _env(spec: ClusterJobConfig, run_config) -> list[dict[str, Any]]:
    network = dict(spec.nccl_env)
    if spec.nccl_socket_ifname:
        network["NCCL_SOCKET_IFNAME"] = spec.nccl_socket_ifname
    env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in sorted({**spec.env, **network}.items())]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref.split("/", 1)[0], "key": ref.split("/", 1)[1]}}}
            for k, ref in sorted(spec.secret_env.items())]
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
    out: dict[str, Any] = {"terminationGracePeriodSeconds": spec.termination_grace_s,
                           "securityContext": podsecurity.pod_security_context(spec.run_as_user)}
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


def _job_labels(spec: ClusterJobConfig) -> dict[str, str]:
    """The job's own labels: the pods' and Kueue's."""
    kueue = {QUEUE_LABEL: spec.queue_name, PRIORITY_LABEL: spec.priority_class}
    return {**_labels(spec), **{k: v for k, v in kueue.items() if v}}


def _pytorchjob(spec: ClusterJobConfig, run_config) -> dict[str, Any]:
    volumes, mounts = _volumes(spec)
    container = {
        "name": PYTORCHJOB_CONTAINER, "image": spec.image or TRAIN_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": list(COMMAND), "env": _env(spec, run_config),
        "ports": [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT, "protocol": "TCP"}],
        "resources": node_resources(spec), "volumeMounts": mounts,
        "securityContext": podsecurity.container_security_context(spec.capabilities),
    }
    pod_spec: dict[str, Any] = {"containers": [container], "volumes": volumes, **_pod_spec_extras(spec)}
    if spec.host_network:  # the node's interfaces (RDMA, several NICs); Services still resolve
        pod_spec.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
    if spec.pod_priority_class:
        pod_spec["priorityClassName"] = spec.pod_priority_class

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": _labels(spec), "annotations": dict(POD_ANNOTATIONS)},
                             "spec": copy.deepcopy(pod_spec)}}

    replicas = {"Master": replica(1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica(spec.nodes - 1)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": spec.backoff_limit}
    if spec.active_deadline_s:
        run_policy["activeDeadlineSeconds"] = spec.active_deadline_s
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _job_labels(spec)},
            "spec": {"nprocPerNode": str(spec.procs_per_node), "runPolicy": run_policy,
                     "pytorchReplicaSpecs": replicas}}


def _trainjob(spec: ClusterJobConfig, run_config) -> dict[str, Any]:
    volumes, mounts = _volumes(spec)
    trainer: dict[str, Any] = {"image": spec.image or TRAIN_IMAGE, "command": list(COMMAND),
                               "env": _env(spec, run_config), "numNodes": spec.nodes,
                               "numProcPerNode": spec.procs_per_node}
    trainer["resourcesPerNode"] = node_resources(spec)
    container = {"name": TRAINJOB_CONTAINER, "volumeMounts": mounts,
                 "securityContext": podsecurity.container_security_context(spec.capabilities)}
    pod = {"metadata": {"labels": _labels(spec), "annotations": dict(POD_ANNOTATIONS)},
           "spec": {**_pod_spec_extras(spec), "volumes": volumes, "containers": [container]}}
    patch = {"manager": "mtnlg.kubeflow.org/launcher",
             "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                 {"name": "node", "template": {"spec": {"template": pod}}}]}}}}
    job_spec: dict[str, Any] = {
        "runtimeRef": {"name": spec.runtime, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"},
        "trainer": trainer, "runtimePatches": [patch]}
    if spec.active_deadline_s:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_s
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": _job_labels(spec)},
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
    level, found = pod_security_level(job)
    if level != "restricted":
        log.warning(podsecurity.level_message(f"the {spec.kind.kind}'s pods", level, found, spec.namespace))
    return job


def pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod templates a job of ours sets: a PyTorchJob's replicas', a TrainJob's runtime patches'."""
    if job.get("kind") == "TrainJob":
        return [rj["template"]["spec"]["template"] for patch in job["spec"].get("runtimePatches") or []
                for rj in (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {})
                .get("replicatedJobs") or []]
    return [r["template"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


def pod_security_level(job: dict[str, Any]) -> tuple[str, list[podsecurity.Violation]]:
    """The Pod Security level the job's pods need (the least strict of its templates') and why."""
    results = [podsecurity.pod_security_level(t.get("spec") or {}, t.get("metadata")) for t in pod_templates(job)]
    worst = max((podsecurity.LEVELS.index(level) for level, _ in results), default=0)
    unique = {str(v): v for _, found in results for v in found}  # a PyTorchJob's replicas break the same rules
    return podsecurity.LEVELS[worst], list(unique.values())


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


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: every replica's pod template written out in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False)


def with_owner(job: dict[str, Any], owner: dict[str, str] | None) -> dict[str, Any]:
    """``job`` owned by ``owner`` (``{"apiVersion", "kind", "name", "uid"}``: the launcher's
    pod), so that deleting the pipeline run's pods garbage-collects the job."""
    if not owner:
        return job
    job = dict(job, metadata=dict(job["metadata"]))
    job["metadata"]["ownerReferences"] = [{**owner, "blockOwnerDeletion": False, "controller": False}]
    return job
