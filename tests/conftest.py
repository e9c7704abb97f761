"""Shared fixtures: a real GCS emulator and a real S3 server (moto) on 127.0.0.1 (no network
needed)."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("MTNLG_LOG_LEVEL", "WARNING")

BUCKET = "mtnlg-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_server():
    """Start ``gcp-storage-emulator`` in-process; yields ``STORAGE_EMULATOR_HOST``."""
    from gcp_storage_emulator.server import create_server

    from mtnlg import storage

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    host = f"http://127.0.0.1:{port}"
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = host
    storage._client_for.cache_clear()
    try:
        yield host
    finally:
        server.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        storage._client_for.cache_clear()


@pytest.fixture
def gcs(gcs_server, request):
    """A fresh ``gs://`` prefix in the emulator's bucket, unique to the test."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    return f"gs://{BUCKET}/{name}"


# What the S3 fixture sets (dummy credentials, the local endpoint, no profile files, no
# instance metadata lookups) and restores afterwards.
_S3_ENV = ("MTNLG_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
           "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
           "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "MTNLG_S3_ADDRESSING_STYLE")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start moto's S3 server in-process on 127.0.0.1 with bucket ``mtnlg-test``; yields the
    endpoint URL (also in ``AWS_ENDPOINT_URL_S3``, with dummy credentials)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from mtnlg import storage

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    endpoint = f"http://127.0.0.1:{port}"
    nothing = str(tmp_path_factory.mktemp("aws") / "none")
    old = {k: os.environ.get(k) for k in _S3_ENV}
    server.start()
    try:
        for k in _S3_ENV:
            os.environ.pop(k, None)
        os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_CONFIG_FILE": nothing, "AWS_SHARED_CREDENTIALS_FILE": nothing,
                           "AWS_EC2_METADATA_DISABLED": "true"})
        storage.clear_client_cache()
        boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.clear_client_cache()


@pytest.fixture
def s3(s3_server, request):
    """A fresh ``s3://`` prefix in the S3 server's bucket, unique to the test."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    return f"s3://{BUCKET}/{name}"


TIERS = ("unit", "distributed", "e2e")


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier (``pytestmark`` in its file): ``make test-fast``
    runs the unit tier, ``make test`` all three."""
    untiered = [i.nodeid for i in items if sum(1 for t in TIERS if i.get_closest_marker(t)) != 1]
    if untiered:
        raise pytest.UsageError(f"tests without exactly one tier marker {TIERS}: {untiered[:5]}")
