"""An offline, in-process fake of the Kubeflow Model Registry REST API, for tests.

    with FakeModelRegistry() as reg:
        client = model_registry.ModelRegistry(reg.url, author="me", is_secure=False)
        client.register_model("gpt", "gs://b/m/hf", version="1", model_format_name="huggingface",
                              model_format_version="1")
        reg.registered_models      # {"1": {"id": "1", "name": "gpt", ...}}: the stored JSON
        reg.requests               # every request: method, path, query, body, headers

It serves ``/api/model_registry/v1`` on 127.0.0.1 (a free port) from a
``ThreadingHTTPServer`` in a daemon thread, with the JSON shapes of the real server (the
Go ``model-registry`` REST server) as its generated Python client reads them.

**Emulated:**

* registered models, model versions and model artifacts: create (``POST`` on the
  collections, ``POST /registered_models/{id}/versions``, ``POST
  /model_versions/{id}/artifacts``, which also updates an artifact sent with its ``id``),
  get by id, ``PATCH`` (a merge of the given fields), list (``pageSize``, ``orderBy``
  ``ID``/``CREATE_TIME``/``LAST_UPDATE_TIME``, ``sortOrder``, ``nextPageToken``, a
  version's artifacts by ``artifactType``/``name``), and find by ``name`` (and
  ``parentResourceId``) or ``externalId`` (``/registered_model``, ``/model_version``,
  ``/model_artifact``);
* ids as strings of integers, one counter for the contexts (registered models and versions)
  and one for the artifacts, as in the real store; ``createTimeSinceEpoch`` and
  ``lastUpdateTimeSinceEpoch`` as strings of milliseconds; ``state`` defaulting to ``LIVE``
  (``UNKNOWN`` for artifacts); ``registeredModelId`` on versions; ``customProperties``
  stored and returned as given (``{}`` when none);
* the real server's errors, as JSON ``{"code": "<HTTP status text>", "message": ...}``: 404
  for an unknown id or a find with no match (``no registered models found for name=...,
  externalId=...: not found``), 400 for a find without its parameters or a non-numeric id,
  409 for a duplicate name (registered model names are unique; version names within their
  registered model; artifact names within their version); Go's plain-text ``404 page not
  found`` for an unknown path;
* :attr:`FakeModelRegistry.fail_next` answers the next requests with a given status, and
  :attr:`FakeModelRegistry.token`, when set, answers requests without ``Authorization:
  Bearer <token>`` with a 401.

**Not emulated:** the other resource kinds (serving environments, inference services, serve
models, doc artifacts, data sets, metrics, parameters, experiments), ``filterQuery``,
archiving rules, validation of the bodies beyond the fields used here, TLS, and persistence.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

PREFIX = "/api/model_registry/v1"
JSON = dict[str, Any]


@dataclass
class RecordedRequest:
    method: str
    path: str                    # without the query, e.g. /api/model_registry/v1/registered_models
    query: dict[str, str]        # the last value of each parameter
    body: Any                    # the parsed JSON body, or None
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0              # what the fake answered


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _now_ms() -> str:
    return str(int(time.time() * 1000))


def _id(value: str, what: str) -> str:
    if not value.isdigit():
        raise ApiError(400, f"invalid {what} id {value!r}: bad request")
    return value


_ORDER_KEYS = {"ID": lambda o: int(o["id"]), "CREATE_TIME": lambda o: (int(o["createTimeSinceEpoch"]), int(o["id"])),
               "LAST_UPDATE_TIME": lambda o: (int(o["lastUpdateTimeSinceEpoch"]), int(o["id"]))}


class FakeModelRegistry:
    """The fake registry; a context manager that serves it while in the ``with`` block."""

    def __init__(self) -> None:
        self.registered_models: dict[str, JSON] = {}
        self.model_versions: dict[str, JSON] = {}
        self.model_artifacts: dict[str, JSON] = {}
        self.artifact_parent: dict[str, str] = {}     # artifact id -> model version id
        self.requests: list[RecordedRequest] = []
        self.token: str | None = None
        self.fail_next: list[int] = []                # statuses for the next requests, in order
        self._lock = threading.RLock()
        self._next_context = 1
        self._next_artifact = 1
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- serving --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                registry._serve(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-model-registry", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what tests read ------------------------------------------------------------------

    def writes(self) -> list[RecordedRequest]:
        """The requests that could change something (all but GET)."""
        with self._lock:
            return [r for r in self.requests if r.method != "GET"]

    def artifacts_of(self, model_version_id: str) -> list[JSON]:
        with self._lock:
            return [a for i, a in sorted(self.model_artifacts.items(), key=lambda kv: int(kv[0]))
                    if self.artifact_parent.get(i) == model_version_id]

    # -- the HTTP side --------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record = RecordedRequest(h.command, parts.path, query, body, dict(h.headers.items()))
        with self._lock:
            self.requests.append(record)
            try:
                status, payload = self._dispatch(h.command, parts.path, query, body, h.headers.get("Authorization"))
            except ApiError as e:
                status, payload = e.status, {"code": HTTPStatus(e.status).phrase, "message": e.message}
        record.status = status
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _dispatch(self, method: str, path: str, query: dict[str, str], body: Any,
                  auth: str | None) -> tuple[int, Any]:
        if self.fail_next:
            status = self.fail_next.pop(0)
            raise ApiError(status, f"injected failure {status}")
        if self.token is not None and auth != f"Bearer {self.token}":
            raise ApiError(401, "missing or wrong bearer token")
        if not path.startswith(PREFIX + "/"):
            return 404, "404 page not found\n"
        seg = path[len(PREFIX) + 1:].rstrip("/").split("/")
        if method in ("POST", "PATCH") and not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object: bad request")
        route = (method, seg[0], len(seg))
        if route == ("GET", "registered_models", 1):
            return 200, self._list(self.registered_models.values(), query)
        if route == ("POST", "registered_models", 1):
            return 201, self._create_registered_model(body)
        if route == ("GET", "registered_models", 2):
            return 200, self._get(self.registered_models, _id(seg[1], "registered model"), "registered model")
        if route == ("PATCH", "registered_models", 2):
            return 200, self._patch(self.registered_models, _id(seg[1], "registered model"), "registered model", body)
        if route == ("GET", "registered_models", 3) and seg[2] == "versions":
            rm = self._get(self.registered_models, _id(seg[1], "registered model"), "registered model")
            return 200, self._list([v for v in self.model_versions.values() if v["registeredModelId"] == rm["id"]],
                                   query)
        if route == ("POST", "registered_models", 3) and seg[2] == "versions":
            return 201, self._create_model_version({**body, "registeredModelId": _id(seg[1], "registered model")})
        if route == ("GET", "registered_model", 1):
            return 200, self._find_registered_model(query)
        if route == ("GET", "model_versions", 1):
            return 200, self._list(self.model_versions.values(), query)
        if route == ("POST", "model_versions", 1):
            return 201, self._create_model_version(body)
        if route == ("GET", "model_versions", 2):
            return 200, self._get(self.model_versions, _id(seg[1], "model version"), "model version")
        if route == ("PATCH", "model_versions", 2):
            return 200, self._patch(self.model_versions, _id(seg[1], "model version"), "model version", body)
        if route == ("GET", "model_versions", 3) and seg[2] == "artifacts":
            mv = self._get(self.model_versions, _id(seg[1], "model version"), "model version")
            items = self.artifacts_of(mv["id"])
            if query.get("artifactType") not in (None, "", "model-artifact"):
                items = []
            if query.get("name"):
                items = [a for a in items if a.get("name") == query["name"]]
            return 200, self._list(items, query)
        if route == ("POST", "model_versions", 3) and seg[2] == "artifacts":
            return self._upsert_version_artifact(_id(seg[1], "model version"), body)
        if route == ("GET", "model_version", 1):
            return 200, self._find_model_version(query)
        if route == ("GET", "model_artifacts", 1):
            return 200, self._list(self.model_artifacts.values(), query)
        if route == ("POST", "model_artifacts", 1):
            return 201, self._create_model_artifact(body, None)
        if route == ("GET", "model_artifacts", 2):
            return 200, self._get(self.model_artifacts, _id(seg[1], "model artifact"), "model artifact")
        if route == ("PATCH", "model_artifacts", 2):
            return 200, self._patch(self.model_artifacts, _id(seg[1], "model artifact"), "model artifact", body)
        if route == ("GET", "model_artifact", 1):
            return 200, self._find_model_artifact(query)
        return 404, "404 page not found\n"

    # -- the store ------------------------------------------------------------------------

    def _new_context_id(self) -> str:
        i, self._next_context = self._next_context, self._next_context + 1
        return str(i)

    def _new_artifact_id(self) -> str:
        i, self._next_artifact = self._next_artifact, self._next_artifact + 1
        return str(i)

    @staticmethod
    def _stamp(obj: JSON, new_id: str) -> JSON:
        now = _now_ms()
        obj = {k: v for k, v in obj.items() if v is not None and k not in ("createTimeSinceEpoch",
                                                                              "lastUpdateTimeSinceEpoch")}
        obj.setdefault("customProperties", {})
        obj.update(id=new_id, createTimeSinceEpoch=now, lastUpdateTimeSinceEpoch=now)
        return obj

    @staticmethod
    def _get(store: dict[str, JSON], obj_id: str, what: str) -> JSON:
        if obj_id not in store:
            raise ApiError(404, f"no {what} found for id {obj_id}: not found")
        return store[obj_id]

    def _patch(self, store: dict[str, JSON], obj_id: str, what: str, body: JSON) -> JSON:
        obj = self._get(store, obj_id, what)
        fixed = ("id", "name", "createTimeSinceEpoch", "lastUpdateTimeSinceEpoch", "registeredModelId")
        obj.update({k: v for k, v in body.items() if v is not None and k not in fixed})
        obj["lastUpdateTimeSinceEpoch"] = _now_ms()
        return obj

    @staticmethod
    def _list(items: Any, query: dict[str, str]) -> JSON:
        key = _ORDER_KEYS.get(query.get("orderBy") or "ID", _ORDER_KEYS["ID"])
        ordered = sorted(items, key=key, reverse=query.get("sortOrder") == "DESC")
        try:
            size = int(query.get("pageSize") or 20)
            start = int(query.get("nextPageToken") or 0)
        except ValueError:
            raise ApiError(400, "invalid pageSize or nextPageToken: bad request") from None
        page = ordered[start:start + size]
        more = start + size < len(ordered)
        return {"items": page, "nextPageToken": str(start + size) if more else "", "pageSize": size,
                "size": len(page)}

    def _create_registered_model(self, body: JSON) -> JSON:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "required field 'name' is zero value.")
        if any(m["name"] == name for m in self.registered_models.values()):
            raise ApiError(409, f"registered model with name {name} already exists: conflict")
        obj = self._stamp(body, self._new_context_id())
        obj.setdefault("state", "LIVE")
        self.registered_models[obj["id"]] = obj
        return obj

    def _create_model_version(self, body: JSON) -> JSON:
        name, parent = body.get("name"), str(body.get("registeredModelId") or "")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "required field 'name' is zero value.")
        if parent not in self.registered_models:
            raise ApiError(404, f"no registered model found for id {parent}: not found")
        if any(v["name"] == name and v["registeredModelId"] == parent for v in self.model_versions.values()):
            raise ApiError(409, f"model version with name {name} already exists: conflict")
        obj = self._stamp(body, self._new_context_id())
        obj["registeredModelId"] = parent
        obj.setdefault("state", "LIVE")
        self.model_versions[obj["id"]] = obj
        return obj

    def _create_model_artifact(self, body: JSON, parent: str | None) -> JSON:
        if body.get("artifactType", "model-artifact") != "model-artifact":
            raise ApiError(400, f"unsupported artifactType {body.get('artifactType')!r}: bad request")
        name = body.get("name")
        if name and any(a.get("name") == name and self.artifact_parent.get(i) == parent
                        for i, a in self.model_artifacts.items()):
            raise ApiError(409, f"model artifact with name {name} already exists: conflict")
        obj = self._stamp(body, self._new_artifact_id())
        obj["artifactType"] = "model-artifact"
        obj.setdefault("state", "UNKNOWN")
        self.model_artifacts[obj["id"]] = obj
        if parent is not None:
            self.artifact_parent[obj["id"]] = parent
        return obj

    def _upsert_version_artifact(self, mv_id: str, body: JSON) -> tuple[int, JSON]:
        self._get(self.model_versions, mv_id, "model version")
        if body.get("id"):
            art = self._patch(self.model_artifacts, _id(str(body["id"]), "artifact"), "artifact", body)
            self.artifact_parent[art["id"]] = mv_id
            return 200, art
        return 201, self._create_model_artifact(body, mv_id)

    @staticmethod
    def _one(matches: list[JSON], what: str, params: str) -> JSON:
        if not matches:
            raise ApiError(404, f"no {what}s found for {params}: not found")
        if len(matches) > 1:
            raise ApiError(404, f"multiple {what}s found for {params}: not found")
        return matches[0]

    def _find_registered_model(self, query: dict[str, str]) -> JSON:
        name, ext = query.get("name"), query.get("externalId")
        if not name and not ext:
            raise ApiError(400, "invalid parameters call, supply either name or externalId: bad request")
        matches = [m for m in self.registered_models.values()
                   if (not name or m["name"] == name) and (not ext or m.get("externalId") == ext)]
        return self._one(matches, "registered model", f"name={name or ''}, externalId={ext or ''}")

    def _find_model_version(self, query: dict[str, str]) -> JSON:
        name, parent, ext = query.get("name"), query.get("parentResourceId"), query.get("externalId")
        if (not name or not parent) and not ext:
            raise ApiError(400, "invalid parameters call, supply either (name and parentResourceId), or externalId: "
                                "bad request")
        if parent:
            _id(parent, "registered model")
        matches = [v for v in self.model_versions.values()
                   if (not name or v["name"] == name) and (not parent or v["registeredModelId"] == parent)
                   and (not ext or v.get("externalId") == ext)]
        return self._one(matches, "model version",
                         f"name={name or ''}, parentResourceId={parent or ''}, externalId={ext or ''}")

    def _find_model_artifact(self, query: dict[str, str]) -> JSON:
        name, parent, ext = query.get("name"), query.get("parentResourceId"), query.get("externalId")
        if (not name or not parent) and not ext:
            raise ApiError(400, "invalid parameters call, supply either (name and parentResourceId), or externalId: "
                                "bad request")
        if parent:
            _id(parent, "model version")
        matches = [a for i, a in self.model_artifacts.items()
                   if (not name or a.get("name") == name) and (not parent or self.artifact_parent.get(i) == parent)
                   and (not ext or a.get("externalId") == ext)]
        return self._one(matches, "model artifact",
                         f"name={name or ''}, parentResourceId={parent or ''}, externalId={ext or ''}")
