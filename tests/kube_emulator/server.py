"""The API server: kmock's ``KubernetesEmulator`` with the Kubernetes semantics the
``kubernetes`` client relies on (see the package doc): object state and resource versions,
watches with their journal, deletion with finalizers and cascades, pod logs, admission.
It runs in the facade's event loop; the facade (:class:`kube_emulator.KubeEmulator`) is
what tests use."""

from __future__ import annotations

import asyncio
import copy
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import enums

from mtnlg.cluster.admission import AdmissionError, admit
from mtnlg.cluster.schema import load_crd_schema

from .patching import json_patch, merge_patch
from .resources import PODS, TERMINAL_PHASES, Resource, bad_request, not_found, now_rfc3339, unprocessable
from .selectors import Selector

_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
_BOOL_PARAMS = ("watch", "follow", "allowWatchBookmarks", "timestamps", "previous", "pretty",
                "sendInitialEvents", "insecureSkipTLSVerifyBackend")


@attrs.frozen
class _Refused(kmock.KubernetesError):
    """An admission refusal; ``body`` is the API server's Status, answered as it is."""

    body: Any = None


class _PodLog:
    __slots__ = ("finished", "text")

    def __init__(self, text: str = "", finished: bool = False):
        self.text, self.finished = text, finished


class ApiServer(kmock.KubernetesEmulator):
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
            raise bad_request("the request body is not a JSON object")
        async with self._lock:
            md = body.setdefault("metadata", {})
            if not md.get("name"):
                if md.get("generateName"):
                    md["name"] = md["generateName"] + secrets.token_hex(3)[:5]
                else:
                    raise unprocessable("metadata.name: Required value: name or generateName is required")
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
        if self._res(kres) == PODS and (new.get("status") or {}).get("phase") in TERMINAL_PHASES:
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
                raise not_found(kres, name)
            old = copy.deepcopy(obj.raw)
            if isinstance(patch, list):
                new = json_patch(old, patch)
            elif isinstance(patch, Mapping):
                new = merge_patch(old, patch)
            else:
                raise bad_request("the patch is neither a JSON object (merge patch) nor a list (JSON patch)")
            if not isinstance(new, dict):
                raise unprocessable("the patched object is not a JSON object")
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
            raise bad_request("the request body is not a JSON object")
        async with self._lock:
            obj = self._live(kres, ns, name)
            if obj is None:
                raise not_found(kres, name)
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
                raise not_found(kres, name)
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
        select = Selector(ns, None, labels, fields)
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
            raise not_found(kres, request.name)
        return obj

    async def _serve_watch(self, request: kmock.Request) -> Any:
        kres = request.resource
        assert kres is not None
        params = request.params
        select = Selector(request.namespace, request.name, params.get("labelSelector"), params.get("fieldSelector"))
        try:
            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
            since = int(params.get("resourceVersion") or 0)
        except ValueError as e:
            raise bad_request(f"invalid watch parameter: {e}") from None
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
            raise not_found(self._kres(PODS), pod)
        try:
            tail = int(params["tailLines"]) if params.get("tailLines") else None
            limit = int(params["limitBytes"]) if params.get("limitBytes") else None
        except ValueError as e:
            raise bad_request(f"invalid log parameter: {e}") from None
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
        return (self._objects[key].raw.get("status") or {}).get("phase") in TERMINAL_PHASES

    async def close_streams(self) -> None:
        self._closing = True
        async with self._log_changed:
            self._log_changed.notify_all()
        for task in list(self._streams):
            task.cancel()
