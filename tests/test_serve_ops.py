"""Running ``mtnlg serve``: the API key, request-size and token limits, the Prometheus
metrics, health and readiness, and the drain on SIGTERM of a real ``mtnlg serve`` process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve import NAME, ServerThread, _free_port, local_model, model_dir  # noqa: F401  (the fixtures)

from mtnlg.model.decode import prompt_ids_for

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    with ServerThread(model_dir, api_key=KEY, max_model_len=64, max_request_bytes=2048, max_batch_size=4,
                      max_queue=8, batch_wait_ms=5) as s:
        yield s


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of ``GET /metrics``."""
    r = httpx.get(url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_api_key_is_required_except_on_the_probes(server, monkeypatch):
    from mtnlg.serve import guard

    compared = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    body = {"model": NAME, "prompt": "list", "max_tokens": 2}
    none = httpx.post(server.url + "/v1/completions", json=body)
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    assert none.json() == {"error": {"message": "Missing API key: send it as 'Authorization: Bearer KEY'",
                                     "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    wrong = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "Incorrect API key provided"
    assert compared == [(b"sk-wrong", KEY.encode())]  # compared in constant time
    for path in ("/v1/models", "/metrics", "/tokenize"):
        assert httpx.request("POST" if path == "/tokenize" else "GET", server.url + path).status_code == 401
    assert httpx.post(server.url + "/v1/completions", json=body, headers=AUTH).status_code == 200
    for probe in ("/health", "/ready"):  # open: Kubernetes probes carry no key
        assert httpx.get(server.url + probe).status_code == 200
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "model": NAME}
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [NAME]


def test_request_size_and_token_limits(server, local_model):  # noqa: F811
    _, tok = local_model
    big = {"model": NAME, "prompt": "list " * 500, "max_tokens": 2}  # over 2048 bytes
    r = httpx.post(server.url + "/v1/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json() == {"error": {
        "message": "the request body exceeds this server's limit of 2048 bytes (--max-request-bytes)",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
    data = json.dumps(big).encode()  # no Content-Length: counted as it arrives
    r = httpx.post(server.url + "/v1/completions", content=iter([data[:1000], data[1000:]]),
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    n = len(prompt_ids_for(tok, "sort the list"))
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=NAME, prompt="sort the list", max_tokens=64 - n + 1)
    assert e.value.body == {
        "message": f"This server's maximum context length is 64 tokens (--max-model-len; the model's is 128). "
                   f"However, you requested 65 tokens ({n} in the prompt, {64 - n + 1} for the completion).",
        "type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded"}
    ok = c.completions.create(model=NAME, prompt="sort the list", max_tokens=64 - n, temperature=0,
                              extra_body={"min_tokens": 64 - n})
    assert ok.usage.total_tokens == 64
    with pytest.raises(openai.BadRequestError, match="the prompt alone has") as e:
        c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "list " * 70}])
    assert e.value.body["param"] == "messages"
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "sort the list"}],
                                     temperature=0, extra_body={"min_tokens": 1})
    assert chat.usage.total_tokens <= 64  # the default reply length is cut to what fits
    assert c.models.list().data[0].model_extra["max_model_len"] == 64
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}, headers=AUTH).json()["max_model_len"] == 64


def test_metrics_count_requests_tokens_and_latency(model_dir):  # noqa: F811
    """A fresh server: two completions, one streamed chat, one 400, one 401, then exact counts."""
    with ServerThread(model_dir, api_key=KEY) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        a = c.completions.create(model=NAME, prompt="sort the list", max_tokens=5, temperature=0,
                                 extra_body={"min_tokens": 5})
        b = c.completions.create(model=NAME, prompt="pop", max_tokens=3, n=2, temperature=0,
                                 extra_body={"min_tokens": 3})
        chunks = list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                temperature=0, extra_body={"min_tokens": 4}, stream=True,
                                                stream_options={"include_usage": True}))
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model=NAME, prompt="   ")
        assert httpx.get(s.url + "/v1/models").status_code == 401
        m = _metrics(s.url)
    comp, chat = (("endpoint", "/v1/completions"),), (("endpoint", "/v1/chat/completions"),)
    assert m[("mtnlg_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 2
    assert m[("mtnlg_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))] == 1
    assert m[("mtnlg_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
    assert m[("mtnlg_requests_total", (("endpoint", "/v1/models"), ("status", "401")))] == 1
    assert m[("mtnlg_prompt_tokens_total", comp)] == a.usage.prompt_tokens + b.usage.prompt_tokens
    assert m[("mtnlg_completion_tokens_total", comp)] == 5 + 2 * 3
    assert a.usage.completion_tokens + b.usage.completion_tokens == 5 + 2 * 3
    assert m[("mtnlg_completion_tokens_total", chat)] == 4 == chunks[-1].usage.completion_tokens
    assert m[("mtnlg_prompt_tokens_total", chat)] == chunks[-1].usage.prompt_tokens
    assert m[("mtnlg_request_latency_seconds_count", comp)] == 3
    assert m[("mtnlg_time_to_first_token_seconds_count", comp)] == 2  # the refused one made no token
    assert m[("mtnlg_time_to_first_token_seconds_count", chat)] == 1
    assert 0 < m[("mtnlg_time_to_first_token_seconds_sum", chat)] <= m[("mtnlg_request_latency_seconds_sum", chat)]
    assert m[("mtnlg_queue_depth", ())] == 0 and m[("mtnlg_requests_in_flight", ())] == 0
    assert m[("mtnlg_batch_occupancy", ())] == 0  # every request has left the running batch


def test_mtnlg_serve_drains_on_sigterm(model_dir):  # noqa: F811
    """`mtnlg serve` as a user starts it (the key from MTNLG_API_KEY). SIGTERM while one
    request's body is still arriving and a streamed reply is under way: /ready turns 503,
    new requests get 503, /health stays 200; both requests finish; then it exits 0."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MTNLG_LOG_LEVEL": "INFO", "MTNLG_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "mtnlg.cli", "serve", model_dir, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    release, slow = threading.Event(), {}
    try:
        _wait_for(lambda: httpx.get(url + "/ready").status_code == 200, proc, "server did not come up")
        assert httpx.get(url + "/v1/models").status_code == 401
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        # a request whose body is still on its way when the signal comes
        body = json.dumps({"model": NAME, "prompt": "sort the dict", "max_tokens": 6, "min_tokens": 6,
                           "temperature": 0}).encode()

        def send_slowly():
            def parts():
                yield body[:10]
                release.wait(30)
                yield body[10:]
            slow["r"] = httpx.post(url + "/v1/completions", content=parts(),
                                   headers={**AUTH, "content-type": "application/json"}, timeout=60)

        sender = threading.Thread(target=send_slowly)
        sender.start()
        _wait_for(lambda: _metrics(url)[("mtnlg_requests_in_flight", ())] == 1, proc, "the slow request never arrived")
        stream = c.completions.create(model=NAME, prompt="sort the dict", max_tokens=50, extra_body={"min_tokens": 50},
                                      temperature=0, stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: httpx.get(url + "/ready").status_code == 503, proc, "/ready did not turn 503")
        assert httpx.get(url + "/ready").json() == {"status": "draining"}
        health = httpx.get(url + "/health")
        assert health.status_code == 200 and health.json()["draining"] is True
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=NAME, prompt="list", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body == {
            "message": "the server is shutting down; retry on another replica", "type": "server_error",
            "param": None, "code": "shutting_down"}
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        assert (first.choices[0].text + "".join(ch.choices[0].text for ch in rest)).strip()
        assert proc.poll() is None  # still draining: the slow request is in flight
        release.set()
        sender.join(30)
        r = slow["r"]
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    # the streamed reply may have been written out whole before the signal came
    assert re.search(r"draining: [12] requests in flight", out) and "engine stopped" in out, out[-2000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health")


def _wait_for(cond, proc, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if cond():
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, what
        time.sleep(0.05)
