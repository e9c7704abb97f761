"""An offline, in-process Kubernetes API server for tests, built on ``kmock``.

The real ``kubernetes`` client talks to it over HTTP on 127.0.0.1; a test plays the
operator/kubelet through the emulator's own methods, which change the cluster state directly
(and wake the client's watches), e.g.::

    with KubeEmulator() as kube:
        custom = kubernetes.client.CustomObjectsApi(kube.api_client)
        custom.create_namespaced_custom_object("kubeflow.org", "v1", "ns", "pytorchjobs", job)
        job = kube.get_object(*PYTORCHJOBS, "ns", "job-1")          # a dict, uid stamped
        pod = kube.create_pod("ns", "job-1-master-0", labels={...}, phase="Running", owner=job)
        kube.set_pod_log("ns", "job-1-master-0", "step 1\\nstep 2\\n")
        kube.create_event("ns", "job-1-master-0", reason="Pulled", message="image pulled")
        kube.set_condition(*PYTORCHJOBS, "ns", "job-1", "Succeeded")  # watchers get MODIFIED

``kmock.KubernetesEmulator`` (0.8) provides the HTTP routing of Kubernetes URLs, API
discovery, the object store (``kmock.objects``, with every version), the per-resource event
buses, Kubernetes-style error bodies and its reaction DSL (``kube.kmock[...] << ...``, e.g.
to inject a 500); its own create/get/list/watch handlers are replaced here by ones that add
what the Kubernetes client relies on and kmock lacks:

* ``?watch=True`` (what the Python client sends) is read as ``watch=true``; so are
  ``follow=True`` and the other boolean query parameters;
* ``metadata.uid``, ``resourceVersion`` (one counter for the whole cluster, bumped on every
  change), ``creationTimestamp``, ``generation``, ``namespace``; ``generateName``;
  ``apiVersion``/``kind`` when missing; new pods get ``status.phase: Pending``;
* label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and field
  selectors (``=``, ``==``, ``!=`` on any dotted path, e.g. ``metadata.name``,
  ``involvedObject.name``, ``status.phase``) on list, watch and delete-collection;
* watch: ``timeoutSeconds`` (the server ends the stream, as the real one does),
  ``resourceVersion`` (replays the changes after that version from a journal, so
  ``kubernetes.watch.Watch`` reconnects see no duplicate ADDED events; a version older than
  :meth:`KubeEmulator.expire_watch_history` gets the ``ERROR 410 Gone`` event); no event is
  lost between the initial state and the live stream;
* PATCH as a JSON merge patch (dict body; also what strategic merge patches become) or a
  JSON patch (list body); the ``status`` subresource changes only ``.status``;
  PUT (replace) with the optimistic-concurrency 409 on a stale ``resourceVersion``, keeping
  ``.status`` as it was (as for resources with a status subresource);
* DELETE honours finalizers (``deletionTimestamp`` first, gone when the last finalizer
  goes), cascades to objects whose ``ownerReferences`` name the deleted uid (unless
  ``propagationPolicy: Orphan``; Foreground is done at once, like Background);
  DELETE on a collection (with selectors);
* ``pods/{name}/log`` serves text set by the test, with ``container``, ``tailLines``,
  ``limitBytes``, and ``follow=true`` streaming: the text so far, then what
  :meth:`KubeEmulator.append_pod_log` adds, until the log is finished, the pod reaches
  Succeeded/Failed, the pod is deleted or the emulator stops;
* error bodies like the real server's: 404 ``NotFound`` and 409 ``AlreadyExists`` /
  ``Conflict`` with ``details`` ``{name, group, kind}``;
* admission of TrainJobs, PyTorchJobs and InferenceServices that a client creates (POST),
  replaces (PUT) or patches as a cluster admits them (``mtnlg.cluster.admission.admit``):
  ObjectMeta, the CRD's OpenAPI schema and CEL rules (``x-kubernetes-validations``; on an
  update the transition rules too, against the stored object; the status subresource is not
  admitted) when the CRD file is found (``crds``;
  by default ``../shared/schemas``), then the operator's validating webhook. A refusal is
  the real answer: 422 ``Invalid`` with ``details.causes``, 403 "admission webhook ...
  denied the request", or 400 for unknown fields with ``?fieldValidation=Strict`` (without
  it they are dropped, as the API server prunes them). The test's own direct methods (the
  operator's side) are not admitted;
* mutating admission webhooks: functions registered with :meth:`KubeEmulator.mutate` change
  a client's object on create and update before it is validated, as the API server runs
  them (e.g. a test-side Kueue that suspends every job naming a queue).

Not emulated: authentication/RBAC, admission and validation of other resources (any dict is
accepted; a CRD need not exist, though listing a resource nobody declared or created is a
404, as for a missing CRD), defaulting beyond the above, strategic-merge list semantics (lists are
replaced), server-side apply, ``limit``/``continue`` paging (all items in one page),
BOOKMARK events, watch events for objects moving in/out of a selector (an event is sent
when the object *after* the change matches), ``exec``/``attach``/``portforward``,
namespaces' existence, and operators/kubelets: nothing happens unless the test does it
(directly, or from a reactor registered with :meth:`KubeEmulator.on`).

Concurrency: the server runs an asyncio loop in a daemon thread; every method of
:class:`KubeEmulator` is thread-safe and blocks until done, and must not be called from the
loop's own thread (i.e. not from a kmock reaction callback; reactors from :meth:`on` run in
a separate controller thread and may call them).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import queue
import re
import secrets
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import aiohttp.test_utils
import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import enums

from mtnlg.cluster.admission import AdmissionError, admit
from mtnlg.cluster.schema import load_crd_schema

__all__ = [
    "CLUSTERTRAININGRUNTIMES",
    "CONFIGMAPS",
    "DEFAULT_CRDS",
    "EVENTS",
    "INFERENCESERVICES",
    "JOBS",
    "JOBSETS",
    "PODS",
    "PYTORCHJOBS",
    "SECRETS",
    "SERVICES",
    "TRAININGRUNTIMES",
    "TRAINJOBS",
    "KubeEmulator",
    "KubeError",
    "Resource",
    "match_fields",
    "match_labels",
    "now_rfc3339",
]

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
_SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
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

_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
_BOOL_PARAMS = ("watch", "follow", "allowWatchBookmarks", "timestamps", "previous", "pretty",
                "sendInitialEvents", "insecureSkipTLSVerifyBackend")
_TERMINAL_PHASES = ("Succeeded", "Failed")


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes it: ``2024-01-02T03:04:05Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------- selectors
def _split_top(sel: str) -> list[str]:
    """Split a selector at the commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SET_TERM = re.compile(rf"^({_KEY})\s+(in|notin)\s+\((.*)\)$")
_EQ_TERM = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)$")
_EXISTS_TERM = re.compile(rf"^(!?)\s*({_KEY})$")
_FIELD_TERM = re.compile(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$")


def _bad_request(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=400, reason="BadRequest", message=message, details={})


def _label_predicates(selector: str | None) -> list[Callable[[Mapping[str, str]], bool]]:
    preds: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_top(selector or ""):
        if m := _SET_TERM.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                preds.append(lambda labels, k=key, vs=values: k in labels and labels[k] in vs)
            else:
                preds.append(lambda labels, k=key, vs=values: k not in labels or labels[k] not in vs)
        elif m := _EQ_TERM.match(term):
            key, op, value = m.groups()
            if op == "!=":
                preds.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                preds.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif m := _EXISTS_TERM.match(term):
            neg, key = m.groups()
            preds.append((lambda labels, k=key: k not in labels) if neg else (lambda labels, k=key: k in labels))
        else:
            raise _bad_request(f"unable to parse requirement: {term!r} in label selector {selector!r}")
    return preds


def match_labels(labels: Mapping[str, str] | None, selector: str | None) -> bool:
    """Whether ``labels`` match a Kubernetes label ``selector`` (``a=b,c!=d,e in (f,g),!h``)."""
    labels = labels or {}
    return all(p(labels) for p in _label_predicates(selector))


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return ""
        cur = cur[part]
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def _field_predicates(selector: str | None) -> list[Callable[[Mapping[str, Any]], bool]]:
    preds: list[Callable[[Mapping[str, Any]], bool]] = []
    for term in _split_top(selector or ""):
        m = _FIELD_TERM.match(term)
        if not m:
            raise _bad_request(f"invalid field selector term {term!r} in {selector!r}")
        path, op, value = m.group(1), m.group(2), m.group(3).strip()
        if op == "!=":
            preds.append(lambda obj, p=path, v=value: _field_value(obj, p) != v)
        else:
            preds.append(lambda obj, p=path, v=value: _field_value(obj, p) == v)
    return preds


def match_fields(obj: Mapping[str, Any], selector: str | None) -> bool:
    """Whether ``obj`` matches a field ``selector`` (``metadata.name=x,status.phase!=Running``)."""
    return all(p(obj) for p in _field_predicates(selector))


def _not_found(kres: kmock.resource, name: str | None) -> kmock.KubernetesError:
    qual = f"{kres.plural}.{kres.group}" if kres.group else f"{kres.plural}"
    return kmock.KubernetesError(status=404, reason="NotFound", message=f'{qual} "{name}" not found',
                                 details={"name": name or "", "group": kres.group or "", "kind": kres.plural or ""})


class _Selector:
    def __init__(self, namespace: str | None, name: str | None, labels: str | None, fields: str | None):
        self.namespace, self.name = namespace, name
        self._labels = _label_predicates(labels)
        self._fields = _field_predicates(fields)

    def __call__(self, obj: Mapping[str, Any]) -> bool:
        md = obj.get("metadata") or {}
        if self.namespace is not None and md.get("namespace") != self.namespace:
            return False
        if self.name is not None and md.get("name") != self.name:
            return False
        labels = md.get("labels") or {}
        return all(p(labels) for p in self._labels) and all(p(obj) for p in self._fields)


# ---------------------------------------------------------------------------------- patches
def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, ``None`` deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _unprocessable(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _unprocessable(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=422, reason="Invalid", message=message, details={})


@attrs.frozen
class _Refused(kmock.KubernetesError):
    """An admission refusal; ``body`` is the API server's Status, answered as it is."""

    body: Any = None


def _json_patch(doc: Any, ops: list[Mapping[str, Any]]) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)

    def parent(parts: list[str]) -> tuple[Any, str]:
        cur = doc
        for part in parts[:-1]:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        return cur, parts[-1]

    def get(parts: list[str]) -> Any:
        cur = doc
        for part in parts:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        return cur

    def remove(parts: list[str]) -> Any:
        container, key = parent(parts)
        return container.pop(int(key)) if isinstance(container, list) else container.pop(key)

    def add(parts: list[str], value: Any) -> None:
        nonlocal doc
        if not parts:
            doc = value
            return
        container, key = parent(parts)
        if isinstance(container, list):
            container.insert(len(container) if key == "-" else int(key), value)
        else:
            container[key] = value

    for op in ops:
        try:
            kind, parts = op["op"], _pointer(op["path"])
            if kind == "add":
                add(parts, copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(parts)
            elif kind == "replace":
                get(parts)  # must exist
                if parts:
                    remove(parts)
                add(parts, copy.deepcopy(op["value"]))
            elif kind in ("move", "copy"):
                value = get(_pointer(op["from"]))
                if kind == "move":
                    remove(_pointer(op["from"]))
                add(parts, copy.deepcopy(value))
            elif kind == "test":
                if get(parts) != op["value"]:
                    raise _unprocessable(f"test failed at {op['path']}")
            else:
                raise _unprocessable(f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise _unprocessable(f"JSON patch {op!r} does not apply: {e!r}") from None
    return doc


# ---------------------------------------------------------------------------------- the server
class _PodLog:
    __slots__ = ("finished", "text")

    def __init__(self, text: str = "", finished: bool = False):
        self.text, self.finished = text, finished


class _Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with Kubernetes semantics the ``kubernetes`` client relies on."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = 0
        self._kinds: dict[Resource, str] = {}
        self._journal: dict[kmock.resource, list[tuple[int, dict[str, Any]]]] = {}
        self._history_floor = 0
        self._logs: dict[tuple[str, str, str | None], _PodLog] = {}
        self._log_changed = asyncio.Condition()
        self._streams: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._on_event: Callable[[Resource, str, dict[str, Any]], None] | None = None
        self._admitted: dict[Resource, tuple[str, Path | None]] = {}  # resource -> (kind, CRD file)
        self._mutators: dict[Resource, list[Callable[[dict[str, Any], dict[str, Any] | None], None]]] = {}

    # ------------------------------------------------------------ admission
    def _admit(self, kres: kmock.resource, body: Any, old: Mapping[str, Any] | None, params: Mapping[str, str]) -> None:
        """Admit a client's create (``old`` None) or update of ``body`` (changed in place:
        pruned unknown fields, a name from ``generateName``; the mutating webhooks' changes), or
        raise the cluster's refusal."""
        res = self._res(kres)
        if isinstance(body, dict):  # mutating admission runs first, then validation
            for mutate in self._mutators.get(res, ()):
                mutate(body, copy.deepcopy(dict(old)) if old is not None else None)
        if res not in self._admitted or not isinstance(body, dict):
            return
        kind, crd = self._admitted[res]
        body.setdefault("apiVersion", res.api_version)
        body.setdefault("kind", kind)
        md = body.get("metadata")
        if isinstance(md, dict) and not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + secrets.token_hex(3)[:5]
        schema = load_crd_schema(crd) if crd is not None and crd.exists() else None
        status = body.pop("status", None)  # the status subresource's: not the client's to set
        try:
            admit(body, schema, old={k: v for k, v in old.items() if k != "status"} if old is not None else None,
                  preflight=False, field_validation=params.get("fieldValidation") or "Warn")
        except AdmissionError as e:
            answer = e.status()
            raise _Refused(status=answer["code"], reason=answer["reason"], message=answer["message"],
                           details=answer.get("details"), body=answer) from None
        finally:
            if status is not None:
                body["status"] = status

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, _Refused):
            return aiohttp.web.json_response(exc.body, status=exc.status)
        return await super()._render_error(exc)

    # ------------------------------------------------------------ resources
    def declare(self, res: Resource, kind: str | None, namespaced: bool = True,
                subresources: Iterable[str] = ()) -> None:
        self.resources[self._kres(res)] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=set(_VERBS), subresources=set(subresources),
            singular=kind.lower() if kind else None)
        if kind:
            self._kinds[res] = kind

    @staticmethod
    def _kres(res: Resource | kmock.resource) -> kmock.resource:
        return kmock.resource(res.group or "", res.version, res.plural)

    @staticmethod
    def _res(kres: kmock.resource) -> Resource:
        return Resource(kres.group or "", kres.version or "", kres.plural or "")

    def _known(self, kres: kmock.resource) -> bool:
        return kres in set(self._get_resources())

    # ------------------------------------------------------------ state (call under self._lock)
    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _live(self, kres: kmock.resource, ns: str | None, name: str) -> Any:
        key = (kres, ns, name)
        if key in self._objects:
            obj = self._objects[key]
            if not obj.deleted:
                return obj
        return None

    def _iter_live(self, kres: kmock.resource | None = None) -> list[tuple[tuple[Any, Any, str], Any]]:
        return [(key, obj) for key, obj in self._objects.items()
                if not obj.deleted and (kres is None or key[0] == kres)]

    @staticmethod
    def _details(kres: kmock.resource, name: str | None) -> dict[str, Any]:
        return {"name": name or "", "group": kres.group or "", "kind": kres.plural or ""}

    def _not_found(self, kres: kmock.resource, name: str | None) -> kmock.KubernetesError:
        return _not_found(kres, name)

    async def _emit(self, kres: kmock.resource, kind: str, raw: Mapping[str, Any]) -> None:
        event = {"type": kind, "object": copy.deepcopy(dict(raw))}
        rv = int((raw.get("metadata") or {}).get("resourceVersion") or self._rv)
        self._journal.setdefault(kres, []).append((rv, event))
        await self._buses[kres].put(event)
        if self._on_event is not None:
            self._on_event(self._res(kres), kind, copy.deepcopy(event["object"]))

    async def op_create(self, kres: kmock.resource, ns: str | None, body: Any) -> dict[str, Any]:
        """Create ``body`` (modified in place: stamped) or raise 409; emits ADDED."""
        if not isinstance(body, dict):
            raise _bad_request("the request body is not a JSON object")
        async with self._lock:
            md = body.setdefault("metadata", {})
            if not md.get("name"):
                if md.get("generateName"):
                    md["name"] = md["generateName"] + secrets.token_hex(3)[:5]
                else:
                    raise _unprocessable("metadata.name: Required value: name or generateName is required")
            ns = ns if ns is not None else md.get("namespace")
            name = md["name"]
            if self._live(kres, ns, name) is not None:
                qual = f"{kres.plural}.{kres.group}" if kres.group else f"{kres.plural}"
                raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                            message=f'{qual} "{name}" already exists',
                                            details=self._details(kres, name))
            if ns is not None:
                md["namespace"] = ns
            md["uid"] = str(uuid.uuid4())
            md["resourceVersion"] = self._next_rv()
            md["creationTimestamp"] = now_rfc3339()
            md["generation"] = 1
            for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                md.pop(key, None)
            res = self._res(kres)
            body.setdefault("apiVersion", res.api_version)
            if "kind" not in body and res in self._kinds:
                body["kind"] = self._kinds[res]
            if res == PODS:
                status = body.setdefault("status", {})
                status.setdefault("phase", "Pending")
            key = (kres, ns, name)
            if key in self._objects:
                self._objects[key].create(copy.deepcopy(body))
            else:
                self._objects[key] = copy.deepcopy(body)
            await self._emit(kres, "ADDED", body)
            return copy.deepcopy(body)

    async def _store(self, kres: kmock.resource, key: tuple[Any, Any, str], obj: Any, new: dict[str, Any],
                     old: Mapping[str, Any], spec_may_change: bool) -> dict[str, Any]:
        """Store ``new`` as the next version of ``obj`` (under the lock); emits MODIFIED or DELETED."""
        old_md = old.get("metadata") or {}
        md = new.setdefault("metadata", {})
        for k in ("name", "namespace", "uid", "creationTimestamp"):
            if k in old_md:
                md[k] = old_md[k]
            else:
                md.pop(k, None)
        if old_md.get("deletionTimestamp"):
            md["deletionTimestamp"] = old_md["deletionTimestamp"]
        gen = int(old_md.get("generation") or 1)
        md["generation"] = gen + 1 if spec_may_change and new.get("spec") != old.get("spec") else gen
        md["resourceVersion"] = self._next_rv()
        obj.history.append(copy.deepcopy(new))
        if self._res(kres) == PODS and (new.get("status") or {}).get("phase") in _TERMINAL_PHASES:
            await self._finish_logs(key[1], key[2])  # the containers exited: their log streams end
        if md.get("deletionTimestamp") and not md.get("finalizers"):
            await self._finish_delete(kres, key, obj, cascade="Background")
        else:
            await self._emit(kres, "MODIFIED", new)
        return copy.deepcopy(new)

    async def op_patch(self, kres: kmock.resource, ns: str | None, name: str, patch: Any,
                       subresource: str | None = None, admit: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Patch the object; ``admit`` (a client's request parameters) admits the result first."""
        async with self._lock:
            obj = self._live(kres, ns, name)
            if obj is None:
                raise self._not_found(kres, name)
            old = copy.deepcopy(obj.raw)
            if isinstance(patch, list):
                new = _json_patch(old, patch)
            elif isinstance(patch, Mapping):
                new = _merge_patch(old, patch)
            else:
                raise _bad_request("the patch is neither a JSON object (merge patch) nor a list (JSON patch)")
            if not isinstance(new, dict):
                raise _unprocessable("the patched object is not a JSON object")
            if subresource == "status":
                new = dict(copy.deepcopy(old), status=new.get("status"))
                if new["status"] is None:
                    new.pop("status")
            elif admit is not None:
                self._admit(kres, new, old, admit)
            return await self._store(kres, (kres, ns, name), obj, new, old, subresource != "status")

    async def op_replace(self, kres: kmock.resource, ns: str | None, name: str, body: Any,
                         subresource: str | None = None, admit: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Replace the object (409 on a stale ``resourceVersion``); ``admit`` (a client's
        request parameters) admits the new object first, after that check, as the server does."""
        if not isinstance(body, dict):
            raise _bad_request("the request body is not a JSON object")
        async with self._lock:
            obj = self._live(kres, ns, name)
            if obj is None:
                raise self._not_found(kres, name)
            old = copy.deepcopy(obj.raw)
            want = (body.get("metadata") or {}).get("resourceVersion")
            have = (old.get("metadata") or {}).get("resourceVersion")
            if want and str(want) != str(have):
                qual = f"{kres.plural}.{kres.group}" if kres.group else f"{kres.plural}"
                raise kmock.KubernetesError(
                    status=409, reason="Conflict", details=self._details(kres, name),
                    message=f'Operation cannot be fulfilled on {qual} "{name}": the object has been modified; '
                            "please apply your changes to the latest version and try again")
            new = copy.deepcopy(body)
            if subresource == "status":
                new = dict(copy.deepcopy(old), status=new.get("status"))
            else:  # the main resource: .status is the status subresource's, kept as it is
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                if admit is not None:
                    self._admit(kres, new, old, admit)
            return await self._store(kres, (kres, ns, name), obj, new, old, subresource != "status")

    async def op_delete(self, kres: kmock.resource, ns: str | None, name: str,
                        propagation: str | None = None) -> dict[str, Any]:
        async with self._lock:
            obj = self._live(kres, ns, name)
            if obj is None:
                raise self._not_found(kres, name)
            return await self._delete_locked(kres, (kres, ns, name), obj, propagation or "Background")

    async def _delete_locked(self, kres: kmock.resource, key: tuple[Any, Any, str], obj: Any,
                             cascade: str) -> dict[str, Any]:
        raw = copy.deepcopy(obj.raw)
        md = raw.setdefault("metadata", {})
        if md.get("deletionTimestamp"):
            return raw
        if md.get("finalizers"):
            md["deletionTimestamp"] = now_rfc3339()
            md["resourceVersion"] = self._next_rv()
            obj.history.append(copy.deepcopy(raw))
            await self._emit(kres, "MODIFIED", raw)
            return raw
        return await self._finish_delete(kres, key, obj, cascade)

    async def _finish_delete(self, kres: kmock.resource, key: tuple[Any, Any, str], obj: Any,
                             cascade: str) -> dict[str, Any]:
        raw = copy.deepcopy(obj.raw)
        raw.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
        obj.history.append(copy.deepcopy(raw))
        obj.delete()
        await self._emit(kres, "DELETED", raw)
        _, ns, name = key
        if self._res(kres) == PODS:
            await self._finish_logs(ns, name)
        uid = raw["metadata"].get("uid")
        if uid and cascade != "Orphan":
            for dkey, dep in self._iter_live():
                if dep.deleted:  # gone in an earlier step of this cascade
                    continue
                refs = (dep.raw.get("metadata") or {}).get("ownerReferences") or []
                if any(r.get("uid") == uid for r in refs):
                    await self._delete_locked(dkey[0], dkey, dep, cascade)
        return raw

    async def op_list(self, kres: kmock.resource, ns: str | None, labels: str | None = None,
                      fields: str | None = None) -> tuple[list[dict[str, Any]], str]:
        select = _Selector(ns, None, labels, fields)
        async with self._lock:
            items = [copy.deepcopy(obj.raw) for _, obj in self._iter_live(kres)]
            return [i for i in items if select(i)], str(self._rv)

    async def op_get(self, kres: kmock.resource, ns: str | None, name: str) -> dict[str, Any] | None:
        async with self._lock:
            obj = self._live(kres, ns, name)
            return None if obj is None else copy.deepcopy(obj.raw)

    # ------------------------------------------------------------ pod logs (state)
    def _find_log(self, ns: str, pod: str, container: str | None) -> _PodLog | None:
        if (ns, pod, container) in self._logs:
            return self._logs[ns, pod, container]
        if (ns, pod, None) in self._logs:
            return self._logs[ns, pod, None]
        if container is None:
            for (lns, lpod, _), log in self._logs.items():
                if (lns, lpod) == (ns, pod):
                    return log
        return None

    async def op_log(self, ns: str, pod: str, text: str, container: str | None, append: bool,
                     finished: bool | None) -> None:
        async with self._log_changed:
            log = self._logs.setdefault((ns, pod, container), _PodLog())
            log.text = log.text + text if append else text
            if finished is not None:
                log.finished = finished
            self._log_changed.notify_all()

    async def _finish_logs(self, ns: str | None, pod: str) -> None:
        async with self._log_changed:
            for (lns, lpod, _), log in self._logs.items():
                if (lns, lpod) == (ns, pod):
                    log.finished = True
            self._log_changed.notify_all()

    # ------------------------------------------------------------ HTTP
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # The Python client sends booleans as ``True``/``False``; kmock understands ``watch=true`` only.
        query = raw_request.rel_url.query
        fixes = {k: query[k].lower() for k in _BOOL_PARAMS if query.get(k) in ("True", "False", "TRUE", "FALSE")}
        if query.get("watch") == "1":
            fixes["watch"] = "true"
        if fixes:
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.update_query(fixes))
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        kres, method = request.resource, request.method
        if kres is None or kres.plural is None:  # discovery, /version, non-Kubernetes paths
            return await kmock.RawHandler._handle(self, request)
        ns, name, sub = request.namespace, request.name, request.subresource
        if self._res(kres) == PODS and sub == "log" and method == enums.method.GET and name:
            return await self._serve_pod_log(request)
        params = request.params
        if request.action == enums.action.CREATE:
            self._admit(kres, request.data, None, params)
            # Stamps request.data in place, so kmock's fallback (and any reaction) serves the stamped object.
            await self.op_create(kres, ns, request.data)
        elif request.action == enums.action.UPDATE and name:
            await self.op_patch(kres, ns, name, request.data, sub, admit=params)
        elif request.action == enums.action.DELETE and name:
            body = request.data if isinstance(request.data, Mapping) else {}
            await self.op_delete(kres, ns, name, body.get("propagationPolicy") or params.get("propagationPolicy"))
        elif method == enums.method.PUT and name:
            return aiohttp.web.json_response(await self.op_replace(kres, ns, name, request.data, sub, admit=params))
        elif method == enums.method.DELETE and not name:  # deletecollection
            items, _ = await self.op_list(kres, ns, params.get("labelSelector"), params.get("fieldSelector"))
            for item in items:
                md = item["metadata"]
                try:
                    await self.op_delete(kres, md.get("namespace"), md["name"])
                except kmock.KubernetesError:
                    pass
            return aiohttp.web.json_response(self._list_body(kres, items, str(self._rv)))
        return await kmock.RawHandler._handle(self, request)

    def _list_body(self, kres: kmock.resource, items: list[dict[str, Any]], rv: str) -> dict[str, Any]:
        res = self._res(kres)
        body: dict[str, Any] = {"apiVersion": res.api_version, "metadata": {"resourceVersion": rv}, "items": items}
        if res in self._kinds:
            body["kind"] = self._kinds[res] + "List"
        return body

    async def _serve_list(self, request: kmock.Request) -> Any:
        kres = request.resource
        assert kres is not None
        if not self._known(kres):
            raise kmock.KubernetesError(status=404, reason="NotFound",
                                        message="the server could not find the requested resource",
                                        details=self._details(kres, None))
        params = request.params
        items, rv = await self.op_list(kres, request.namespace, params.get("labelSelector"),
                                       params.get("fieldSelector"))
        return self._list_body(kres, items, rv)

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        kres = request.resource
        assert kres is not None and request.name is not None
        obj = await self.op_get(kres, request.namespace, request.name)
        if obj is None:
            raise self._not_found(kres, request.name)
        return obj

    async def _serve_watch(self, request: kmock.Request) -> Any:
        kres = request.resource
        assert kres is not None
        params = request.params
        select = _Selector(request.namespace, request.name, params.get("labelSelector"), params.get("fieldSelector"))
        try:
            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
            since = int(params.get("resourceVersion") or 0)
        except ValueError as e:
            raise _bad_request(f"invalid watch parameter: {e}") from None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        bus = self._buses[kres]
        async with self._lock:  # the snapshot and the bus mark together: no event lost or doubled
            mark = await bus.mark()
            if since and since < self._history_floor:
                initial = [{"type": "ERROR", "object": {
                    "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since} ({self._history_floor})"}}]
            elif since:
                initial = [copy.deepcopy(ev) for rv, ev in self._journal.get(kres, []) if rv > since]
            else:
                initial = [{"type": "ADDED", "object": copy.deepcopy(obj.raw)} for _, obj in self._iter_live(kres)]
        yield b""  # send the headers now, even if nothing happens for a while
        try:
            for event in initial:
                if event["type"] == "ERROR":
                    yield event
                    return
                if select(event["object"]):
                    yield event
            while not self._closing:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    event = await asyncio.wait_for(bus.get(since=mark), remaining)
                except asyncio.TimeoutError:
                    return
                if select(event["object"]):
                    yield event
        finally:
            try:
                await bus.unmark(mark)
            except (ValueError, RuntimeError):
                pass
            if task is not None:
                self._streams.discard(task)

    async def _serve_pod_log(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        ns, pod = request.namespace or "", request.name or ""
        params = request.params
        container = params.get("container") or None
        follow = params.get("follow") in ("true", "1")
        if await self.op_get(self._kres(PODS), ns, pod) is None:
            raise self._not_found(self._kres(PODS), pod)
        try:
            tail = int(params["tailLines"]) if params.get("tailLines") else None
            limit = int(params["limitBytes"]) if params.get("limitBytes") else None
        except ValueError as e:
            raise _bad_request(f"invalid log parameter: {e}") from None
        async with self._log_changed:
            log = self._find_log(ns, pod, container)
            text = log.text if log is not None else ""
        sent = len(text)
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:]) if tail > 0 else ""
        if limit is not None:
            text = text.encode()[:limit].decode("utf-8", "ignore")
        if not follow:
            return aiohttp.web.Response(text=text, content_type="text/plain")
        raw = request._raw_request
        assert raw is not None
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            await resp.prepare(raw)
            if text:
                await resp.write(text.encode())
            while True:
                async with self._log_changed:
                    log = self._find_log(ns, pod, container)
                    more = log.text[sent:] if log is not None else ""
                    sent += len(more)
                    done = (log is not None and log.finished) or self._closing or await self._pod_done(ns, pod)
                    if not more and not done:
                        await self._log_changed.wait()
                        continue
                if more:
                    await resp.write(more.encode())
                if done:
                    break
            await resp.write_eof()
        except ConnectionError:
            pass
        finally:
            if task is not None:
                self._streams.discard(task)
        return resp

    async def _pod_done(self, ns: str, pod: str) -> bool:
        key = (self._kres(PODS), ns, pod)
        if key not in self._objects or self._objects[key].deleted:
            return True
        return (self._objects[key].raw.get("status") or {}).get("phase") in _TERMINAL_PHASES

    async def close_streams(self) -> None:
        self._closing = True
        async with self._log_changed:
            self._log_changed.notify_all()
        for task in list(self._streams):
            task.cancel()


# ---------------------------------------------------------------------------------- the facade
def _owner_ref(owner: Mapping[str, Any], controller: bool = True) -> dict[str, Any]:
    md = owner.get("metadata") or {}
    if not md.get("uid"):
        raise ValueError("the owner has no metadata.uid (pass the object as the emulator returned it)")
    return {"apiVersion": owner.get("apiVersion", "v1"), "kind": owner.get("kind", ""), "name": md.get("name"),
            "uid": md["uid"], "controller": controller, "blockOwnerDeletion": True}


def _container_status(name: str, phase: str, exit_code: int | None, reason: str | None, image: str,
                      restart_count: int) -> dict[str, Any]:
    now = now_rfc3339()
    if phase == "Running":
        state: dict[str, Any] = {"running": {"startedAt": now}}
    elif phase in _TERMINAL_PHASES:
        code = exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1)
        state = {"terminated": {"exitCode": code, "reason": reason or ("Completed" if code == 0 else "Error"),
                                "startedAt": now, "finishedAt": now}}
    else:
        state = {"waiting": {"reason": reason or "ContainerCreating"}}
    return {"name": name, "image": image, "imageID": "", "ready": phase == "Running", "started": phase == "Running",
            "restartCount": restart_count, "state": state}


class KubeEmulator:
    """An in-process Kubernetes API server on 127.0.0.1 for the real ``kubernetes`` client.

    Use as a context manager (or ``start()``/``stop()``); see the module doc for what it
    emulates. ``resources`` declares extra ``{Resource: kind}`` next to
    :data:`DEFAULT_RESOURCES` (only needed for discovery and for listing while empty).
    ``crds``: ``{Resource: (kind, CRD file or None)}``, the resources whose creates and
    replaces are admitted (default :data:`DEFAULT_CRDS`; ``{}``: none).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 resources: Mapping[Resource, str] | None = None, call_timeout: float = 10.0,
                 crds: Mapping[Resource, tuple[str, str | Path | None]] | None = None):
        self._host, self._port = host, port
        self._extra_resources = dict(resources or {})
        # resource -> (kind, CRD file or None): what a client's writes are admitted for
        self._crds = {r: (k, Path(c) if c else None) for r, (k, c) in (DEFAULT_CRDS if crds is None else crds).items()}
        self.call_timeout = call_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._emulator: _Emulator | None = None
        self._server: aiohttp.test_utils.RawTestServer | None = None
        self._api_client: Any = None
        self._reactors: list[tuple[Resource, tuple[str, ...], Callable[[str, dict[str, Any]], Any]]] = []
        self._work: queue.Queue[Any] = queue.Queue()
        self._controller: threading.Thread | None = None
        self.controller_errors: list[BaseException] = []

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if exc_type is None and self.controller_errors:
            raise RuntimeError(f"{len(self.controller_errors)} reactor(s) failed; the first: "
                               f"{''.join(traceback.format_exception(self.controller_errors[0]))}")

    def start(self) -> Self:
        if self._loop is not None:
            raise RuntimeError("the emulator is already started")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="kube-emulator", daemon=True)
        self._thread.start()
        ready.wait(self.call_timeout)
        self._call(self._astart())
        self._controller = threading.Thread(target=self._controller_loop, name="kube-emulator-controller",
                                            daemon=True)
        self._controller.start()
        return self

    async def _astart(self) -> None:
        emu = _Emulator(strict=False)
        for res, (kind, namespaced, subs) in DEFAULT_RESOURCES.items():
            emu.declare(res, kind, namespaced, subs)
        for res, kind in self._extra_resources.items():
            emu.declare(Resource(*res), kind, True, ("status",))
        emu._on_event = self._dispatch
        emu._admitted = dict(self._crds)
        await emu.__aenter__()
        server = aiohttp.test_utils.RawTestServer(emu, host=self._host, port=self._port or None)
        await server.start_server(access_log=None)  # no aiohttp access log lines in the test output
        self._emulator, self._server = emu, server

    def stop(self) -> None:
        if self._loop is None:
            return
        self._work.put(None)
        if self._controller is not None:
            self._controller.join(self.call_timeout)
        try:
            self._call(self._astop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(self.call_timeout)
            self._loop.close()
            self._loop = None
            if self._api_client is not None:
                self._api_client.close()
                self._api_client = None

    async def _astop(self) -> None:
        assert self._emulator is not None and self._server is not None
        await self._emulator.close_streams()
        await asyncio.sleep(0)
        await self._server.close()
        await self._emulator.__aexit__(None, None, None)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def _call(self, coro: Any) -> Any:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the emulator is not started")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("KubeEmulator methods block: do not call them from the emulator's event loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.call_timeout)

    # ------------------------------------------------------------ clients
    @property
    def port(self) -> int:
        assert self._server is not None and self._server.port is not None, "not started"
        return int(self._server.port)

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def configuration(self) -> Any:
        """A fresh ``kubernetes.client.Configuration`` for this server (no auth, no TLS)."""
        import kubernetes.client

        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        cfg.verify_ssl = False
        cfg.api_key = {}
        cfg.proxy = None
        return cfg

    def new_api_client(self) -> Any:
        """Another ``kubernetes.client.ApiClient`` for this server; the caller closes it."""
        import kubernetes.client

        return kubernetes.client.ApiClient(self.configuration())

    @property
    def api_client(self) -> Any:
        """The shared ``kubernetes.client.ApiClient`` for this server (closed by ``stop()``)."""
        if self._api_client is None:
            self._api_client = self.new_api_client()
        return self._api_client

    @property
    def custom_objects(self) -> Any:
        import kubernetes.client

        return kubernetes.client.CustomObjectsApi(self.api_client)

    @property
    def core_v1(self) -> Any:
        import kubernetes.client

        return kubernetes.client.CoreV1Api(self.api_client)

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """A kubeconfig for ``kubernetes.config.load_kube_config(config_file=path)``."""
        path = Path(path)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "emulator", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator",
                                                          "namespace": namespace}}],
        }))
        return path

    @property
    def kmock(self) -> kmock.KubernetesEmulator:
        """The underlying kmock handler (its DSL reactions, ``objects``); touch it via :meth:`in_loop`."""
        assert self._emulator is not None, "not started"
        return self._emulator

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the server's event loop (e.g. to add kmock reactions) and return its result."""
        async def run() -> Any:
            return fn()

        return self._call(run())

    @property
    def requests(self) -> list[kmock.Request]:
        """Every request the server got so far (kmock ``Request``: method, url, params, data...)."""
        return self._call(self._arequests())

    async def _arequests(self) -> list[kmock.Request]:
        assert self._emulator is not None
        return list(self._emulator._requests)

    @property
    def server_errors(self) -> list[Exception]:
        """Unexpected server-side exceptions (HTTP 500s); Kubernetes errors (404, 409...) are not here."""
        async def errors() -> list[Exception]:
            assert self._emulator is not None
            return [e for e in self._emulator.errors if not isinstance(e, kmock.KubernetesError)]

        return self._call(errors())

    # ------------------------------------------------------------ objects (direct, wakes watches)
    def declare_resource(self, group: str, version: str, plural: str, kind: str, namespaced: bool = True) -> None:
        """Make a resource discoverable and listable while it has no objects (like installing a CRD)."""
        async def run() -> None:
            assert self._emulator is not None
            self._emulator.declare(Resource(group, version, plural), kind, namespaced, ("status",))

        self._call(run())

    def mutate(self, group: str, version: str, plural: str,
               fn: Callable[[dict[str, Any], dict[str, Any] | None], None]) -> None:
        """Register a mutating admission webhook for a resource: ``fn(obj, old)`` changes a
        client's object in place on create (``old`` None) and on update, before validation.
        It runs in the server's loop: it must not call this emulator's methods."""
        async def run() -> None:
            assert self._emulator is not None
            self._emulator._mutators.setdefault(Resource(group, version, plural), []).append(fn)

        self._call(run())

    def _k(self, group: str, version: str, plural: str) -> kmock.resource:
        return kmock.resource(group, version, plural)

    def create_object(self, group: str, version: str, plural: str, namespace: str | None,
                      body: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object as the API would (stamped metadata, ADDED event); KubeError 409 if it exists."""
        assert self._emulator is not None
        return self._call(self._emulator.op_create(self._k(group, version, plural), namespace,
                                                   copy.deepcopy(dict(body))))

    def get_object(self, group: str, version: str, plural: str, namespace: str | None,
                   name: str) -> dict[str, Any] | None:
        """A copy of the object, or None when there is none."""
        assert self._emulator is not None
        return self._call(self._emulator.op_get(self._k(group, version, plural), namespace, name))

    def list_objects(self, group: str, version: str, plural: str, namespace: str | None = None, *,
                     label_selector: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:
        """Copies of the live objects (all namespaces when ``namespace`` is None), selectors applied."""
        assert self._emulator is not None
        items, _ = self._call(self._emulator.op_list(self._k(group, version, plural), namespace, label_selector,
                                                     field_selector))
        return items

    def patch_object(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                     patch: Mapping[str, Any] | list[Any], *, subresource: str | None = None) -> dict[str, Any]:
        """Merge-patch (dict) or JSON-patch (list) the object; MODIFIED event; KubeError 404 if missing."""
        assert self._emulator is not None
        return self._call(self._emulator.op_patch(self._k(group, version, plural), namespace, name,
                                                  copy.deepcopy(patch), subresource))

    def delete_object(self, group: str, version: str, plural: str, namespace: str | None, name: str, *,
                      propagation_policy: str = "Background") -> dict[str, Any]:
        """Delete as the API would (finalizers, cascade to owned objects); KubeError 404 if missing."""
        assert self._emulator is not None
        return self._call(self._emulator.op_delete(self._k(group, version, plural), namespace, name,
                                                   propagation_policy))

    def set_status(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                   **status: Any) -> dict[str, Any]:
        """Merge ``status`` fields into ``.status`` (the status subresource; MODIFIED event)."""
        return self.patch_object(group, version, plural, namespace, name, {"status": status}, subresource="status")

    def set_conditions(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                       conditions: list[Mapping[str, Any]], **status: Any) -> dict[str, Any]:
        """Replace ``.status.conditions`` (plus other ``status`` fields); watchers get MODIFIED."""
        return self.set_status(group, version, plural, namespace, name,
                               conditions=[dict(c) for c in conditions], **status)

    def set_condition(self, group: str, version: str, plural: str, namespace: str | None, name: str,
                      type: str, status: str = "True", *, reason: str | None = None, message: str | None = None,
                      **status_fields: Any) -> dict[str, Any]:
        """Add or update the condition of ``type`` as an operator does (``lastTransitionTime``
        changes with the status only); other ``status_fields`` are merged into ``.status``.
        E.g. PyTorchJob ``Created``/``Running``/``Succeeded``/``Failed``, TrainJob ``Complete``/``Failed``."""
        obj = self.get_object(group, version, plural, namespace, name)
        if obj is None:
            raise _not_found(self._k(group, version, plural), name)
        now = now_rfc3339()
        conditions = [dict(c) for c in ((obj.get("status") or {}).get("conditions") or [])]
        new = {"type": type, "status": status, "reason": reason or type, "message": message or "",
               "lastUpdateTime": now, "lastTransitionTime": now}
        for i, c in enumerate(conditions):
            if c.get("type") == type:
                if c.get("status") == status and c.get("lastTransitionTime"):
                    new["lastTransitionTime"] = c["lastTransitionTime"]
                conditions[i] = new
                break
        else:
            conditions.append(new)
        return self.set_conditions(group, version, plural, namespace, name, conditions, **status_fields)

    def expire_watch_history(self) -> None:
        """From now on a watch from an older ``resourceVersion`` gets ``ERROR 410 Gone`` (as after compaction)."""
        async def run() -> None:
            assert self._emulator is not None
            self._emulator._history_floor = self._emulator._rv + 1
            self._emulator._journal.clear()

        self._call(run())

    # ------------------------------------------------------------ pods, logs, events
    def create_pod(self, namespace: str, name: str, *, labels: Mapping[str, str] | None = None,
                   phase: str = "Pending", containers: Iterable[str] = ("main",), image: str = "emulated:latest",
                   owner: Mapping[str, Any] | None = None, node_name: str | None = None,
                   annotations: Mapping[str, str] | None = None, exit_code: int | None = None,
                   reason: str | None = None, message: str | None = None, restart_count: int = 0,
                   container_statuses: list[Mapping[str, Any]] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create a v1 Pod in ``phase`` with container statuses to match (running / terminated with
        ``exit_code`` (default 0 for Succeeded, 1 for Failed) / waiting), owned by ``owner``
        (an object as returned by this emulator: its uid goes into ``ownerReferences``)."""
        names = list(containers)
        md: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
        if annotations:
            md["annotations"] = dict(annotations)
        if owner is not None:
            md["ownerReferences"] = [_owner_ref(owner)]
        spec: dict[str, Any] = {"containers": [{"name": n, "image": image} for n in names], "restartPolicy": "Never"}
        if node_name or phase != "Pending":
            spec["nodeName"] = node_name or "emulated-node"
        status: dict[str, Any] = {"phase": phase, "containerStatuses": [
            dict(s) for s in container_statuses] if container_statuses is not None else [
            _container_status(n, phase, exit_code, reason, image, restart_count) for n in names]}
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        if phase != "Pending":
            status["startTime"] = now_rfc3339()
        body = _merge_patch({"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": spec, "status": status},
                            dict(extra or {}))
        return self.create_object(*PODS, namespace, body)

    def set_pod_phase(self, namespace: str, name: str, phase: str, *, exit_code: int | None = None,
                      reason: str | None = None, message: str | None = None, restart_count: int | None = None,
                      container_statuses: list[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Move a pod to ``phase`` (container statuses regenerated unless given); Succeeded/Failed
        also end its ``follow`` log streams."""
        pod = self.get_object(*PODS, namespace, name)
        if pod is None:
            return self.patch_object(*PODS, namespace, name, {})  # raises the 404
        old = (pod.get("status") or {}).get("containerStatuses") or []
        names = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []] or ["main"]
        image = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("image", "emulated:latest")
        restarts = restart_count if restart_count is not None else int(old[0].get("restartCount", 0)) if old else 0
        statuses = [dict(s) for s in container_statuses] if container_statuses is not None else [
            _container_status(n, phase, exit_code, reason, image, restarts) for n in names]
        status: dict[str, Any] = {"phase": phase, "containerStatuses": statuses, "reason": reason, "message": message}
        if phase != "Pending" and not (pod.get("status") or {}).get("startTime"):
            status["startTime"] = now_rfc3339()
        return self.patch_object(*PODS, namespace, name, {"status": status}, subresource="status")

    def set_pod_log(self, namespace: str, name: str, text: str, *, container: str | None = None,
                    finished: bool = True) -> None:
        """Set a pod's log (of ``container``, or of any container when None). ``finished=False``
        keeps ``follow`` readers waiting for :meth:`append_pod_log` / :meth:`finish_pod_log`."""
        assert self._emulator is not None
        self._call(self._emulator.op_log(namespace, name, text, container, append=False, finished=finished))

    def append_pod_log(self, namespace: str, name: str, text: str, *, container: str | None = None) -> None:
        """Append to a pod's log; ``follow`` readers get the new text at once."""
        assert self._emulator is not None
        self._call(self._emulator.op_log(namespace, name, text, container, append=True, finished=None))

    def finish_pod_log(self, namespace: str, name: str, *, container: str | None = None) -> None:
        """End the ``follow`` streams of a pod's log (as when its container exits)."""
        assert self._emulator is not None
        self._call(self._emulator.op_log(namespace, name, "", container, append=True, finished=True))

    def create_event(self, namespace: str, involved_name: str, *, reason: str, message: str,
                     type: str = "Normal", involved_kind: str = "Pod", involved_api_version: str = "v1",
                     involved_uid: str | None = None, count: int = 1, component: str = "default-scheduler",
                     name: str | None = None) -> dict[str, Any]:
        """Create a v1 Event about an object (a pod by default; its uid looked up when it exists),
        so ``list_namespaced_event(field_selector="involvedObject.name=...")`` finds it."""
        if involved_uid is None and involved_kind == "Pod":
            pod = self.get_object(*PODS, namespace, involved_name)
            involved_uid = ((pod or {}).get("metadata") or {}).get("uid")
        now = now_rfc3339()
        involved = {"kind": involved_kind, "apiVersion": involved_api_version, "name": involved_name,
                    "namespace": namespace}
        if involved_uid:
            involved["uid"] = involved_uid
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": name or f"{involved_name}.{secrets.token_hex(8)}", "namespace": namespace},
                "involvedObject": involved, "reason": reason, "message": message, "type": type, "count": count,
                "firstTimestamp": now, "lastTimestamp": now, "source": {"component": component},
                "reportingComponent": component}
        return self.create_object(*EVENTS, namespace, body)

    # ------------------------------------------------------------ reactors (a test-side controller)
    def on(self, group: str, version: str, plural: str, fn: Callable[[str, dict[str, Any]], Any], *,
           events: Iterable[str] = ("ADDED",)) -> None:
        """Call ``fn(event_type, obj)`` for every change of that resource (any client's or the
        test's), one at a time in the controller thread, where it may call this emulator's
        methods, e.g. make pods for a new PyTorchJob. Exceptions go to ``controller_errors``
        (and are raised when the ``with`` block exits)."""
        self._reactors.append((Resource(group, version, plural), tuple(events), fn))

    def _dispatch(self, res: Resource, kind: str, obj: dict[str, Any]) -> None:  # in the loop, under its lock
        for rres, kinds, fn in self._reactors:
            if rres == res and kind in kinds:
                self._work.put((fn, kind, obj))

    def _controller_loop(self) -> None:
        while True:
            item = self._work.get()
            try:
                if item is None:
                    return
                fn, kind, obj = item
                try:
                    fn(kind, obj)
                except BaseException as e:  # noqa: BLE001 - reported at exit
                    self.controller_errors.append(e)
            finally:
                self._work.task_done()

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until the reactors have handled every event so far (and those they caused)."""
        deadline = time.monotonic() + timeout
        while self._work.unfinished_tasks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reactors still busy after {timeout}s")
            time.sleep(0.005)

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
        """Poll ``predicate()`` until it returns something truthy (returned); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)

