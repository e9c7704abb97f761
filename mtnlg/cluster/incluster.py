"""Where this process runs, when it runs in a pod: its namespace, and who owns what it creates.

A pipeline step's pod learns its namespace from its service account's mounted files and its
own name from ``HOSTNAME``; the job launcher and the deployer create their objects there,
and the job launcher makes its job owned by the step's pod (or the pipeline run's Workflow).
"""

from __future__ import annotations

import os
from typing import Any

from mtnlg.cluster.client import core_v1_api
from mtnlg.progress import get_logger

log = get_logger("mtnlg.cluster")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def pod_namespace(default: str = "kubeflow") -> str:
    """The namespace this pod runs in (a pipeline step's: the user's profile namespace on
    multi-user Kubeflow), else ``default``."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or default
    except OSError:
        return default


def pod_owner(core: Any = None, namespace: str | None = None) -> dict[str, str] | None:
    """The ownerReference for the jobs the launcher creates, or None when not running in a
    pod. On Kubeflow Pipelines (Argo) the step's pod belongs to the run's Workflow: the job
    is then owned by that Workflow, so a retried step (a new pod of the same Workflow) adopts
    a job whose owner is still there, and deleting the pipeline run removes the job. A pod
    of anything else owns the job itself (garbage-collected with the pod)."""
    name = os.environ.get("HOSTNAME")
    if not name or not os.path.exists(SERVICE_ACCOUNT_NAMESPACE):
        return None
    core = core_v1_api(core)
    try:
        pod = core.read_namespaced_pod(name, namespace or pod_namespace())
    except Exception as e:  # noqa: BLE001 - without an owner the job is still cleaned up by policy
        log.warning("could not read the launcher's own pod %s (%s): the job will have no owner", name, e)
        return None
    for ref in pod.metadata.owner_references or []:
        if ref.kind == "Workflow" and str(ref.api_version).startswith("argoproj.io/"):
            return {"apiVersion": ref.api_version, "kind": "Workflow", "name": ref.name, "uid": ref.uid}
    return {"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name, "uid": pod.metadata.uid}
