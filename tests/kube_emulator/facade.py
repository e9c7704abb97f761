"""The facade tests use: :class:`KubeEmulator` starts the API server (:mod:`.server`) in a
thread of its own and plays the cluster's side (operators, kubelets) through direct,
blocking, thread-safe methods."""

from __future__ import annotations

import asyncio
import copy
import queue
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp.test_utils
import kmock
import yaml

from .patching import merge_patch
from .resources import DEFAULT_CRDS, DEFAULT_RESOURCES, EVENTS, PODS, TERMINAL_PHASES, Resource, not_found, now_rfc3339
from .server import ApiServer


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
    elif phase in TERMINAL_PHASES:
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
        self._emulator: ApiServer | None = None
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
        emu = ApiServer(strict=False)
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
            raise not_found(self._k(group, version, plural), name)
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
        body = merge_patch({"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": spec, "status": status},
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
