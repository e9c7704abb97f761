"""The Kubernetes API as the launchers use it: one client set-up, one watch-until-done loop.

* :func:`custom_objects_api`, :func:`core_v1_api`: the real ``kubernetes`` client's APIs,
  on a configuration loaded when they are made: in-cluster in a pod, else the kubeconfig
  (``KUBECONFIG`` read then: the client itself reads it once, when first imported).
* :func:`watch_until`: follow one custom object (a TrainJob, a PyTorchJob, an
  InferenceService) until the caller's look at it says it is done: a GET, then a watch on
  its name until it changes, again and again; the job launcher and the deployer differ
  only in what they look for.
* :func:`status_of`, :func:`transient`: an API error's HTTP status, and whether it is
  trouble worth retrying.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from mtnlg.progress import get_logger

log = get_logger("mtnlg.cluster")

T = TypeVar("T")


class ApiResource(Protocol):
    """Where a custom resource lives in the API (``jobs.JobKind`` is one)."""

    group: str
    version: str
    plural: str
    kind: str


@dataclass(frozen=True)
class CustomResource:
    """A custom resource's place in the API: ``group``/``version``, ``plural``, ``kind``."""

    group: str
    version: str
    plural: str
    kind: str


def _load_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # KUBECONFIG read now: the client reads it once, when first imported
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)


def custom_objects_api(api: Any = None) -> Any:
    """``api`` when given, else a ``CustomObjectsApi`` (in-cluster config in a pod, else the kubeconfig)."""
    if api is not None:
        return api
    from kubernetes import client

    _load_config()
    return client.CustomObjectsApi()


def core_v1_api(api: Any = None) -> Any:
    """``api`` when given, else a ``CoreV1Api`` (in-cluster config in a pod, else the kubeconfig)."""
    if api is not None:
        return api
    from kubernetes import client

    _load_config()
    return client.CoreV1Api()


def status_of(e: Exception) -> int | None:
    """The HTTP status of an API error (``ApiException.status``), None for other errors."""
    return getattr(e, "status", None)


def transient(e: Exception) -> bool:
    """API trouble worth retrying: 429/5xx, and connection errors (urllib3, sockets)."""
    import urllib3

    status = status_of(e)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(e, (urllib3.exceptions.HTTPError, OSError))


def watch_until(custom: Any, resource: ApiResource, name: str, ns: str, look: Callable[[], T | None], *,
                changed: Callable[[str, dict[str, Any]], bool], poll_s: float,
                remaining: Callable[[], float | None] = lambda: None,
                retry: Callable[[Exception], bool] | None = None) -> T:
    """Follow the object ``ns/name`` of ``resource`` until ``look()`` returns something
    (which is returned); ``look`` raises to end the wait otherwise (failed, deleted, timed out).

    Each round: ``look()`` (a GET and what follows from it), then a watch on the object's
    name until ``changed(event_type, obj)`` says so, the next look is due (``poll_s``, or
    ``remaining()`` seconds when fewer; at least 1) or the server ends the watch (a 410, the
    watch's version expired, included: the next GET starts afresh). The client-side read
    timeout bounds a connection that goes silent. An error of a round for which ``retry(e)``
    is true (transient API trouble) is logged and the round is tried again after a back-off
    of 1 s, doubling up to 30 s; without ``retry`` every error ends the wait.
    """
    backoff = 0.0
    while True:
        try:
            found = look()
            if found is not None:
                return found
            left = remaining()
            _watch_once(custom, resource, name, ns, max(1, int(min(poll_s, left if left is not None else poll_s))),
                        changed)
            backoff = 0.0
        except Exception as e:  # sorted by retry: transient or not
            if retry is None or not retry(e):
                raise
            backoff = min(30.0, max(1.0, 2 * backoff))
            log.warning("Kubernetes API trouble while following %s %s/%s (%s): retrying in %.0fs",
                        resource.kind, ns, name, status_of(e) or type(e).__name__, backoff)
            time.sleep(backoff)


def _watch_once(custom: Any, r: ApiResource, name: str, ns: str, wait_s: int,
                changed: Callable[[str, dict[str, Any]], bool]) -> None:
    """Block on a watch of ``ns/name`` until ``changed`` says so, ``wait_s`` pass, or the server ends it."""
    from kubernetes import watch
    from kubernetes.client.rest import ApiException

    w = watch.Watch()
    try:
        for ev in w.stream(custom.list_namespaced_custom_object, r.group, r.version, ns, r.plural,
                           field_selector=f"metadata.name={name}", timeout_seconds=wait_s,
                           _request_timeout=wait_s + 30):
            obj = ev.get("object") or {}
            if (obj.get("metadata") or {}).get("name") != name:
                continue  # servers that ignore the field selector
            if changed(ev.get("type") or "", obj):
                break
    except ApiException as e:
        if status_of(e) != 410:  # 410: the watch's version expired; the next GET starts afresh
            raise
    finally:
        w.stop()
