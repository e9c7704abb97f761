"""A loopback stand-in for the Kubeflow Pipelines REST API (v2beta1) that records every
request: enough of it for ``kfp.Client`` to upload pipelines and versions, create
experiments, runs and recurring runs, and read a run back (whose state a test sets)."""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class FakeKFP:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.run_state = "SUCCEEDED"
        self.task_details: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                url = urlparse(self.path)
                fake.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                      "headers": {k.lower(): v for k, v in self.headers.items()}, "body": raw})
                code, body = fake.route(method, url.path, parse_qs(url.query), raw, self.headers)
                self._reply(code, body)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ the API
    def route(self, method: str, path: str, query: dict, raw: bytes, headers) -> tuple[int, dict]:
        p = path.removeprefix("/apis/v2beta1")
        if method == "GET" and p == "/healthz":
            return 200, {"multi_user": False}
        if method == "GET" and p == "/pipelines":
            flt = json.loads(query.get("filter", ["{}"])[0] or "{}")
            name = next((f.get("string_value") for f in flt.get("predicates", []) if f.get("key") == "name"), None)
            found = [v for v in self.pipelines.values() if name is None or v["display_name"] == name]
            return 200, {"pipelines": found, "total_size": len(found)}
        if method == "POST" and p == "/pipelines/upload":
            pid = str(uuid.uuid4())
            name = query.get("name", ["pipeline"])[0]
            self.pipelines[pid] = {"pipeline_id": pid, "display_name": name}
            self.versions[pid] = [{"pipeline_id": pid, "pipeline_version_id": str(uuid.uuid4()), "display_name": name,
                                   "package": _package(raw)}]
            return 200, self.pipelines[pid]
        if method == "POST" and p == "/pipelines/upload_version":
            pid = query["pipelineid"][0]
            v = {"pipeline_id": pid, "pipeline_version_id": str(uuid.uuid4()), "display_name": query["name"][0],
                 "package": _package(raw)}
            self.versions[pid].append(v)
            return 200, {k: v[k] for k in ("pipeline_id", "pipeline_version_id", "display_name")}
        m = re.fullmatch(r"/pipelines/([^/]+)/versions", p)
        if method == "GET" and m:
            vs = [{k: v[k] for k in ("pipeline_id", "pipeline_version_id", "display_name")}
                  for v in reversed(self.versions.get(m.group(1), []))]
            return 200, {"pipeline_versions": vs, "total_size": len(vs)}
        if method == "GET" and p == "/experiments":
            return 200, {"experiments": list(self.experiments.values()), "total_size": len(self.experiments)}
        if method == "POST" and p == "/experiments":
            body = json.loads(raw or b"{}")
            eid = str(uuid.uuid4())
            self.experiments[eid] = {"experiment_id": eid, "display_name": body.get("display_name"),
                                     "namespace": body.get("namespace")}
            return 200, self.experiments[eid]
        if method == "POST" and p == "/runs":
            body = json.loads(raw or b"{}")
            rid = str(uuid.uuid4())
            self.runs[rid] = {**body, "run_id": rid, "state": "RUNNING"}
            return 200, self.runs[rid]
        m = re.fullmatch(r"/runs/([^/]+)", p)
        if method == "GET" and m:
            run = dict(self.runs[m.group(1)], state=self.run_state,
                       run_details={"task_details": self.task_details})
            return 200, run
        if method == "POST" and p == "/recurringruns":
            body = json.loads(raw or b"{}")
            rid = str(uuid.uuid4())
            self.recurring[rid] = {**body, "recurring_run_id": rid}
            return 200, self.recurring[rid]
        return 404, {"error": f"fake KFP: no route for {method} {path}", "code": 5}


def _package(raw: bytes) -> str:
    """The uploaded pipeline YAML out of a multipart body."""
    text = raw.decode("utf-8", "replace")
    start = text.find("# PIPELINE DEFINITION")
    text = text[start:] if start >= 0 else text
    end = text.rfind("\r\n--")
    return text[:end] if end >= 0 else text
