"""Shared fixtures: a real GCS emulator server on 127.0.0.1 (no network needed)."""

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


TIERS = ("unit", "distributed", "e2e")


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier (``pytestmark`` in its file): ``make test-fast``
    runs the unit tier, ``make test`` all three."""
    untiered = [i.nodeid for i in items if sum(1 for t in TIERS if i.get_closest_marker(t)) != 1]
    if untiered:
        raise pytest.UsageError(f"tests without exactly one tier marker {TIERS}: {untiered[:5]}")
