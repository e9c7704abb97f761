"""What the emulated API serves: the resources (``group, version, plural``), their kinds, the
CRDs a client's writes are admitted against, and the Kubernetes-style errors it answers."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import NamedTuple

import kmock

KubeError = kmock.KubernetesError  # raised by the direct methods: .status, .reason, .message


class Resource(NamedTuple):
    """``group, version, plural``: unpack it into the methods, ``kube.get_object(*PODS, ns, name)``."""

    group: str
    version: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PODS = Resource("", "v1", "pods")
EVENTS = Resource("", "v1", "events")
SERVICES = Resource("", "v1", "services")
CONFIGMAPS = Resource("", "v1", "configmaps")
SECRETS = Resource("", "v1", "secrets")
JOBS = Resource("batch", "v1", "jobs")
PYTORCHJOBS = Resource("kubeflow.org", "v1", "pytorchjobs")
TRAINJOBS = Resource("trainer.kubeflow.org", "v1alpha1", "trainjobs")
TRAININGRUNTIMES = Resource("trainer.kubeflow.org", "v1alpha1", "trainingruntimes")
CLUSTERTRAININGRUNTIMES = Resource("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes")
JOBSETS = Resource("jobset.x-k8s.io", "v1alpha2", "jobsets")
INFERENCESERVICES = Resource("serving.kserve.io", "v1beta1", "inferenceservices")

# The resources a client's writes are admitted for: resource -> (kind, its CRD file)
_SCHEMAS = Path(__file__).resolve().parents[3] / "shared" / "schemas"
DEFAULT_CRDS: dict[Resource, tuple[str, Path]] = {
    TRAINJOBS: ("TrainJob", _SCHEMAS / "trainer.kubeflow.org_trainjobs.yaml"),
    PYTORCHJOBS: ("PyTorchJob", _SCHEMAS / "kubeflow.org_pytorchjobs.yaml"),
    INFERENCESERVICES: ("InferenceService", _SCHEMAS / "serving.kserve.io_inferenceservices.yaml"),
}

# resource -> (kind, namespaced, subresources); served by discovery and listable while empty
DEFAULT_RESOURCES: dict[Resource, tuple[str, bool, tuple[str, ...]]] = {
    PODS: ("Pod", True, ("status", "log")),
    EVENTS: ("Event", True, ()),
    SERVICES: ("Service", True, ("status",)),
    CONFIGMAPS: ("ConfigMap", True, ()),
    SECRETS: ("Secret", True, ()),
    Resource("", "v1", "namespaces"): ("Namespace", False, ("status",)),
    Resource("", "v1", "nodes"): ("Node", False, ("status",)),
    Resource("", "v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True, ("status",)),
    Resource("", "v1", "serviceaccounts"): ("ServiceAccount", True, ()),
    JOBS: ("Job", True, ("status",)),
    PYTORCHJOBS: ("PyTorchJob", True, ("status", "scale")),
    TRAINJOBS: ("TrainJob", True, ("status",)),
    TRAININGRUNTIMES: ("TrainingRuntime", True, ()),
    CLUSTERTRAININGRUNTIMES: ("ClusterTrainingRuntime", False, ()),
    JOBSETS: ("JobSet", True, ("status",)),
}

TERMINAL_PHASES = ("Succeeded", "Failed")


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes it: ``2024-01-02T03:04:05Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def bad_request(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=400, reason="BadRequest", message=message, details={})


def unprocessable(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=422, reason="Invalid", message=message, details={})


def not_found(kres: kmock.resource, name: str | None) -> kmock.KubernetesError:
    qual = f"{kres.plural}.{kres.group}" if kres.group else f"{kres.plural}"
    return kmock.KubernetesError(status=404, reason="NotFound", message=f'{qual} "{name}" not found',
                                 details={"name": name or "", "group": kres.group or "", "kind": kres.plural or ""})
