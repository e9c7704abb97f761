"""Progress posted to Kubeflow Trainer's status endpoint (``mtnlg.train.platform_progress``).

A stand-in for the controller's endpoint runs here: HTTPS on 127.0.0.1 with a certificate of a
CA made by the test, answering as the controller's status server does (200 with the payload
for the current bearer token, a Kubernetes ``Status`` with 403 otherwise, 404 off its path),
and recording every request. Short runs of the real trainer (the ``mtnlg train`` per-process
entry point, in this process) post to it through the three variables a TrainJob gets, once
accepted and once refused; the reporter alone is driven with an injected clock for the
5-second limit, the token and CA rotating, a slow endpoint, and a refused token, an unknown CA
and a dead port. No Trainer controller runs here: what it does with the body (its OIDC check
of the token, the status update) is not exercised.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mtnlg.train.platform_progress import (ENV_CA_CERT, ENV_TOKEN, ENV_URL, Endpoint, ProgressReporter,
                                           TrainProgress)

STATUS_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/gpt/status"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# ---------------------------------------------------------------------------- a CA and a server

def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key, issuer_cert=None, issuer_key=None):
    """A CA certificate (self-signed when no issuer is given) or a server certificate for
    127.0.0.1 signed by the issuer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(timezone.utc)
    is_ca = issuer_cert is None
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(name if is_ca else issuer_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if is_ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False),
                            critical=True)
    else:
        b = (b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False))
    return b.sign(key if is_ca else issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "public_bytes"):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ca_and_server_cert(folder: Path, tag: str) -> tuple[Path, Path, Path]:
    """``(ca.pem, server.pem, server.key)`` of a fresh CA and a server certificate it signs."""
    ca_key, server_key = _key(), _key()
    ca = _certificate(f"trainer-status-ca-{tag}", ca_key)
    cert = _certificate("trainer-status", server_key, ca, ca_key)
    paths = folder / f"ca-{tag}.pem", folder / f"server-{tag}.pem", folder / f"server-{tag}.key"
    for path, data in zip(paths, (_pem(ca), _pem(cert), _pem(server_key))):
        path.write_bytes(data)
    return paths


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        server: StatusServer = self.server.stand_in
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with server.lock:
            token_ok = self.headers.get("Authorization") == f"Bearer {server.token}"
            server.requests.append({"at": time.monotonic(), "path": self.path, "headers": dict(self.headers),
                                    "body": json.loads(raw), "accepted": token_ok and self.path == STATUS_PATH})
        if server.delay_s:
            time.sleep(server.delay_s)
        if self.path != STATUS_PATH:
            code, answer = 404, {"kind": "Status", "status": "Failure", "message": "Not found", "reason": "NotFound"}
        elif not token_ok:
            code, answer = 403, {"kind": "Status", "status": "Failure", "message": "Forbidden", "reason": "Forbidden"}
        else:
            code, answer = 200, json.loads(raw)
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):  # a client that gave up (timed out): not news
        pass


class StatusServer:
    """The controller's status endpoint, as the trainer sees it: the URL, the CA file and the
    token file of a TrainJob's variables."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.delay_s = 0.0
        self.token = "token-1"
        self.token_file = folder / "token"
        self.token_file.write_text(self.token + "\n")
        ca, cert, key = _ca_and_server_cert(folder, "1")
        self.ca_file = folder / "ca.crt"
        self.ca_file.write_bytes(ca.read_bytes())
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.stand_in = self
        self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}{STATUS_PATH}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def env(self) -> dict[str, str]:
        return {ENV_URL: self.url, ENV_CA_CERT: str(self.ca_file), ENV_TOKEN: str(self.token_file)}

    def rotate_token(self, token: str) -> None:
        """The kubelet writes a new token; the old one is no longer accepted."""
        with self.lock:
            self.token = token
        self.token_file.write_text(token + "\n")

    def rotate_ca(self, tag: str) -> None:
        """A new CA and serving certificate; the CA file the pod sees changes with it."""
        ca, cert, key = _ca_and_server_cert(self.folder, tag)
        self.tls.load_cert_chain(cert, key)
        self.ca_file.write_bytes(ca.read_bytes())

    def bodies(self) -> list[dict]:
        with self.lock:
            return [r["body"]["trainerStatus"] for r in self.requests]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def status_server(tmp_path):
    server = StatusServer(tmp_path / "trainer")
    yield server
    server.stop()


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_logged():
    handler = _Warnings()
    logger = logging.getLogger("mtnlg.train.platform")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _progress(step: int, total: int = 10, eta: float | None = 30.0, **metrics) -> TrainProgress:
    return TrainProgress(step, total, eta, {**metrics, "step": step},
                         observed=datetime(2026, 12, 6, 3, 4, 5, 678000, tzinfo=timezone.utc))


def _reporter_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mtnlg-trainer-status" and t.is_alive()]


# ---------------------------------------------------------------------------- the body

@pytest.mark.unit
def test_the_body_is_an_update_trainjob_status_request():
    observed = datetime(2026, 12, 6, 4, 4, 5, 678000, tzinfo=timezone(timedelta(hours=1)))
    body = TrainProgress(2, 3, 12.5, {"loss": 4.25, "tokens_per_s": float("nan"), "val_loss": None, "step": 2,
                                      "x" * 65: 1.0}, observed=observed).body()
    assert body == {"trainerStatus": {
        "progressPercentage": 66,                      # rounded down: 100 only when done
        "estimatedRemainingSeconds": 12,
        "metrics": [{"name": "loss", "value": "4.25"}, {"name": "step", "value": "2"}],  # no NaN, None, long names
        "lastUpdatedTime": "2026-12-06T03:04:05Z"}}    # UTC, whole seconds (metav1.Time)
    assert TrainProgress(3, 3, -4.0, {}).body()["trainerStatus"]["estimatedRemainingSeconds"] == 0
    assert TrainProgress(0, 3, 1e12, {}).body()["trainerStatus"]["estimatedRemainingSeconds"] == 2**31 - 1
    no_eta = TrainProgress(0, 3, None, {}).body()["trainerStatus"]
    assert no_eta["progressPercentage"] == 0 and "estimatedRemainingSeconds" not in no_eta and "metrics" not in no_eta
    assert TIMESTAMP.match(no_eta["lastUpdatedTime"])


@pytest.mark.unit
def test_nothing_happens_without_the_variables(warnings_logged):
    before = len(_reporter_threads())
    assert ProgressReporter.from_env({}) is None
    assert ProgressReporter.from_env({"PATH": "/bin"}) is None
    assert warnings_logged == [] and len(_reporter_threads()) == before
    # half a TrainJob's variables, or a URL that would send the token in the clear: a warning, no reports
    assert Endpoint.from_env({ENV_URL: "https://x/status"}) is None
    assert Endpoint.from_env({ENV_URL: "http://x/status", ENV_CA_CERT: "/ca", ENV_TOKEN: "/t"}) is None
    assert warnings_logged == [
        f"not reporting progress to Kubeflow Trainer: {ENV_URL} set but {ENV_CA_CERT}, {ENV_TOKEN} missing",
        f"not reporting progress to Kubeflow Trainer: {ENV_URL}='http://x/status' is not an https:// URL"]


# ---------------------------------------------------------------------------- the reporter

@pytest.mark.unit
def test_posts_at_most_every_5_seconds_and_always_the_final_state(status_server, warnings_logged):
    clock = FakeClock()
    r = ProgressReporter(Endpoint.from_env(status_server.env()), clock=clock)
    assert r.offer(_progress(1))                      # the first offer goes out at once
    assert r.drain(5)
    clock.t += 4.99
    assert not r.offer(_progress(2))                  # 4.99 s later: not yet
    clock.t += 0.01
    assert r.offer(_progress(3))                      # 5 s after the last post began
    assert r.drain(5)
    clock.t += 1
    assert not r.offer(_progress(4))
    r.close(_progress(10, eta=0.0))                   # the final one, 1 s after the last: sent anyway
    assert not r.offer(_progress(11))                 # nothing after the end
    assert [b["metrics"][-1]["value"] for b in status_server.bodies()] == ["1", "3", "10"]
    assert [b["progressPercentage"] for b in status_server.bodies()] == [10, 30, 100]
    assert status_server.bodies()[-1]["estimatedRemainingSeconds"] == 0
    for req in status_server.requests:
        assert req["accepted"] and req["path"] == STATUS_PATH
        assert req["headers"]["Authorization"] == "Bearer token-1"
        assert req["headers"]["Content-Type"] == "application/json"
    assert (r.posted, r.failed) == (3, 0) and warnings_logged == []
    assert not _reporter_threads()


@pytest.mark.unit
def test_the_token_and_the_ca_are_read_again_for_every_post(status_server, warnings_logged):
    clock = FakeClock()
    r = ProgressReporter(Endpoint.from_env(status_server.env()), clock=clock)
    assert r.offer(_progress(1)) and r.drain(5)
    status_server.rotate_token("token-2")             # the projected token rotates
    clock.t += 5
    assert r.offer(_progress(2)) and r.drain(5)
    status_server.rotate_ca("2")                      # the controller's CA and certificate change
    r.close(_progress(3))
    tokens = [req["headers"]["Authorization"] for req in status_server.requests]
    assert tokens == ["Bearer token-1", "Bearer token-2", "Bearer token-2"]
    assert all(req["accepted"] for req in status_server.requests)
    assert (r.posted, r.failed) == (3, 0) and warnings_logged == []


@pytest.mark.unit
def test_a_slow_endpoint_never_holds_up_the_caller_and_failures_are_logged_once(status_server, warnings_logged):
    status_server.delay_s = 1.0
    clock = FakeClock()
    r = ProgressReporter(Endpoint.from_env(status_server.env()), timeout_s=0.3, clock=clock)
    t0 = time.perf_counter()
    assert r.offer(_progress(1))
    assert time.perf_counter() - t0 < 0.2             # the offer did not wait for the network
    while not status_server.requests:                 # the server has it and takes its time
        time.sleep(0.01)
    clock.t += 10
    t0 = time.perf_counter()
    assert not r.offer(_progress(2))                  # one post in flight: the next waits for a later step
    assert time.perf_counter() - t0 < 0.2
    t0 = time.perf_counter()
    r.close(_progress(10))                            # after the first times out, the final one times out too
    assert time.perf_counter() - t0 < 2 * 0.3 + 1.0 + 0.5
    assert r.failed == 2 and r.posted == 0 and len(status_server.requests) == 2
    assert len(warnings_logged) == 1                  # once, however many fail
    assert warnings_logged[0].startswith(f"could not report progress to Kubeflow Trainer at {status_server.url}: ")
    assert "timed out" in warnings_logged[0]


@pytest.mark.unit
@pytest.mark.parametrize("fault", ["refused token", "unknown CA", "dead port"])
def test_a_failing_endpoint_is_one_warning_then_one_per_5_minutes(status_server, warnings_logged, tmp_path, fault):
    env = status_server.env()
    if fault == "refused token":
        status_server.token = "the-token-of-another-trainjob"
    elif fault == "unknown CA":
        env[ENV_CA_CERT] = str(_ca_and_server_cert(tmp_path, "other")[0])
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env[ENV_URL] = f"https://127.0.0.1:{s.getsockname()[1]}{STATUS_PATH}"
    clock = FakeClock()
    r = ProgressReporter(Endpoint.from_env(env), clock=clock)
    for step in range(1, 4):                          # 3 failures within 5 minutes: one warning
        assert r.offer(_progress(step)) and r.drain(5)
        clock.t += 5
    cause = {"refused token": "HTTP 403 (Forbidden: Forbidden)", "unknown CA": "SSLCertVerificationError",
             "dead port": "ConnectionRefusedError"}[fault]
    assert len(warnings_logged) == 1 and cause in warnings_logged[0], warnings_logged
    clock.t += 300
    r.close(_progress(10))                            # 5 minutes on: the next failure is warned about
    assert (r.posted, r.failed) == (0, 4)
    assert len(warnings_logged) == 2 and warnings_logged[1].startswith(
        "progress reports to Kubeflow Trainer failing: 3 failed posts since the last warning, the latest: ")
    assert len(status_server.requests) == (4 if fault == "refused token" else 0)


# ---------------------------------------------------------------------------- the real trainer

IN_PROCESS = ["--recipe", "debug", "parallel.tp=1", "train.log_every=1", "train.eval_iters=1", "train.steps=3",
              "schedule.decay_steps=20", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> str:
    from corpus_data import tokenized_dir, whatsnew_paragraphs

    docs = whatsnew_paragraphs(max_files=3)
    cut = len(docs) * 9 // 10
    return tokenized_dir(tmp_path_factory.mktemp("progressdata"), docs[:cut], docs[cut:])


def _train(tokenized: str, output: Path) -> tuple[int, list[dict], dict]:
    from mtnlg.cli import main as mtnlg_main

    rc = mtnlg_main(["train", *IN_PROCESS, f"data.path={tokenized}", f"output={output}"])
    rows = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines() if line]
    return rc, rows, json.loads((output / "summary.json").read_text())


def _metrics(**values) -> list[dict]:
    return [{"name": k, "value": v} for k, v in values.items()]


@pytest.mark.e2e
def test_a_training_run_posts_its_progress_and_ends_at_100_percent(tokenized, tmp_path, status_server,
                                                                  monkeypatch, warnings_logged):
    for k, v in status_server.env().items():
        monkeypatch.setenv(k, v)
    started = datetime.now(timezone.utc).replace(microsecond=0)
    rc, rows, summary = _train(tokenized, tmp_path / "run")
    ended = datetime.now(timezone.utc)
    assert rc == 0 and summary["stopped"] == "completed" and [r["step"] for r in rows] == [1, 2, 3]
    assert not _reporter_threads()

    reqs = status_server.requests
    assert all(r["accepted"] and r["headers"]["Authorization"] == "Bearer token-1" for r in reqs)
    bodies = status_server.bodies()
    for b in bodies:
        assert TIMESTAMP.match(b["lastUpdatedTime"])
        assert started <= datetime.strptime(b["lastUpdatedTime"], "%Y-%m-%dT%H:%M:%S%z") <= ended
    first, last = rows[0], rows[-1]
    assert bodies[0] == {                             # step 1: posted at once
        "progressPercentage": 33,
        "estimatedRemainingSeconds": round(first["eta_s"]),
        "metrics": _metrics(loss=repr(first["loss"]), tokens_per_s=repr(first["tokens_per_s"]), step="1",
                            total_steps="3"),
        "lastUpdatedTime": bodies[0]["lastUpdatedTime"]}
    assert bodies[-1] == {                            # the end: 100%, the last logged values
        "progressPercentage": 100,
        "estimatedRemainingSeconds": 0,
        "metrics": _metrics(loss=repr(last["loss"]), tokens_per_s=repr(last["tokens_per_s"]),
                            val_loss=repr(summary["val_loss"]), step="3", total_steps="3"),
        "lastUpdatedTime": bodies[-1]["lastUpdatedTime"]}
    assert float(bodies[-1]["metrics"][0]["value"]) == summary["final_loss"]
    # The run takes less than 5 s, so steps 2 and 3 are not posted; on a slow machine the ones
    # between are 5 s apart.
    assert all(b["at"] - a["at"] >= 4.5 for a, b in zip(reqs[:-2], reqs[1:-1]))
    assert warnings_logged == []


@pytest.mark.e2e
def test_an_endpoint_that_refuses_every_report_never_fails_training(tokenized, tmp_path, status_server, monkeypatch,
                                                                    warnings_logged):
    for k, v in status_server.env().items():
        monkeypatch.setenv(k, v)
    status_server.token = "the-token-of-another-trainjob"   # the pod's token-1 is refused (403)
    rc, rows, summary = _train(tokenized, tmp_path / "run")
    assert rc == 0 and summary["stopped"] == "completed" and summary["steps"] == 3 and len(rows) == 3
    assert not _reporter_threads()
    assert len(status_server.requests) >= 2 and not any(r["accepted"] for r in status_server.requests)
    assert len(warnings_logged) == 1, warnings_logged   # the first post and the final one failed: one warning
    assert "HTTP 403 (Forbidden: Forbidden)" in warnings_logged[0]
