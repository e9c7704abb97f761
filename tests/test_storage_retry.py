"""Storage retries against real servers behind the fault-injecting proxy: transient
failures (429, 5xx, resets, cut answers, timeouts) are retried with bounded, jittered
exponential backoff and logged; a refusal or a missing bucket fails at once naming the URI;
a persistent fault gives up after the stated number of attempts."""

from __future__ import annotations

import logging
import os
import random

import pytest
from fault_proxy import FaultProxy

from mtnlg import storage

pytestmark = pytest.mark.unit


@pytest.fixture(params=["gcs", "s3"])
def store(request, monkeypatch):
    """``(prefix, proxy)``: this test's gs:// or s3:// prefix, reached through a proxy that
    injects no fault until the test says so."""
    kind = request.param
    upstream = request.getfixturevalue(f"{kind}_server")
    prefix = request.getfixturevalue(kind)
    monkeypatch.setenv("MTNLG_STORAGE_BACKOFF_S", "0.01")
    with FaultProxy(upstream, kind, fault_rate=0.0, slow_rate=0.0, seed=5) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST" if kind == "gcs" else "AWS_ENDPOINT_URL_S3", proxy.url)
        storage.clear_client_cache()
        try:
            yield prefix, proxy
        finally:
            storage.clear_client_cache()


def test_the_backoff_is_exponential_capped_and_jittered():
    policy = storage.RetryPolicy(attempts=8, backoff_s=0.5, backoff_max_s=4.0)
    rng = random.Random(0)
    for retry, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)]:
        waits = [policy.delay(retry, rng) for _ in range(200)]
        assert all(cap / 2 <= w <= cap for w in waits), (retry, min(waits), max(waits))
        assert max(waits) - min(waits) > cap / 4  # jittered, not a fixed wait


def test_the_policy_comes_from_the_environment_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("MTNLG_STORAGE_ATTEMPTS", "3")
    monkeypatch.setenv("MTNLG_STORAGE_TIMEOUT_S", "7.5")
    assert storage.retry_policy() == storage.RetryPolicy(attempts=3, timeout_s=7.5)
    monkeypatch.setenv("MTNLG_STORAGE_ATTEMPTS", "three")
    with pytest.raises(ValueError, match="MTNLG_STORAGE_ATTEMPTS='three': expected an integer"):
        storage.retry_policy()
    monkeypatch.setenv("MTNLG_STORAGE_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="MTNLG_STORAGE_ATTEMPTS='0': must be at least 1"):
        storage.retry_policy()


def test_every_operation_survives_transient_faults_and_each_retry_is_logged(store, caplog):
    prefix, proxy = store
    data = os.urandom(300_000)
    proxy.fault_rate = 0.3
    state = random.getstate()
    before = sum(storage.retry_counts().values())
    with caplog.at_level(logging.WARNING, logger="mtnlg.storage"):
        for i in range(4):
            storage.write_bytes(f"{prefix}/d/{i}.bin", data)
        assert all(storage.read_bytes(f"{prefix}/d/{i}.bin") == data for i in range(4))
        with storage.open_read(f"{prefix}/d/0.bin") as f:  # ranged reads
            f.seek(1000)
            assert f.read(5000) == data[1000:6000]
            f.seek(0)
            assert f.read() == data
        assert storage.size(f"{prefix}/d/1.bin") == len(data)
        assert storage.list_files(f"{prefix}/d") == [f"{prefix}/d/{i}.bin" for i in range(4)]
        assert storage.glob(f"{prefix}/d/*.bin") == storage.list_files(f"{prefix}/d")
        assert storage.exists(f"{prefix}/d/2.bin") and storage.isdir(f"{prefix}/d")
        storage.copy(f"{prefix}/d/3.bin", f"{prefix}/e/3.bin")
        assert storage.read_bytes(f"{prefix}/e/3.bin") == data
        storage.remove(f"{prefix}/d")
        assert storage.list_files(f"{prefix}/d") == []
    assert proxy.injected >= 5, proxy.stats
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retried) >= 5
    assert all(m.startswith(prefix) and "attempt" in m for m in retried), retried[:3]
    assert sum(storage.retry_counts().values()) - before == len(retried)
    # the libraries' own retries (whose jitter draws from the global generator) are off
    assert random.getstate() == state


def test_a_cut_or_reset_download_is_asked_for_again(store):
    prefix, proxy = store
    data = os.urandom(200_000)
    storage.write_bytes(f"{prefix}/big.bin", data)
    proxy.faults, proxy.fault_rate = ("cut", "reset_after"), 0.5
    for _ in range(3):
        assert storage.read_bytes(f"{prefix}/big.bin") == data
        with storage.open_read(f"{prefix}/big.bin") as f:
            assert f.read() == data
    assert proxy.stats["cut"] + proxy.stats["reset_after"] >= 2


def test_a_request_slower_than_the_timeout_is_sent_again(store, monkeypatch):
    prefix, proxy = store
    storage.write_bytes(f"{prefix}/t.txt", b"patience")
    monkeypatch.setenv("MTNLG_STORAGE_TIMEOUT_S", "1")
    storage.clear_client_cache()
    proxy.faults, proxy.fault_rate, proxy.slow_rate, proxy.slow_s = (), 0.0, 0.5, (3.0, 3.0)
    assert [storage.read_bytes(f"{prefix}/t.txt") for _ in range(6)] == [b"patience"] * 6
    assert proxy.stats["slow"] >= 1


@pytest.mark.parametrize("status, error", [(403, PermissionError), (400, storage.RemoteStorageError)])
def test_a_permanent_error_fails_at_once_naming_the_uri(store, status, error):
    prefix, proxy = store
    storage.write_bytes(f"{prefix}/x.txt", b"x")
    proxy.force = status
    n = proxy.stats["requests"]
    with pytest.raises(error) as e:
        storage.read_bytes(f"{prefix}/x.txt")
    assert f"{prefix}/x.txt" in str(e.value)
    if status == 403:
        assert "access denied" in str(e.value)
    assert proxy.stats["requests"] - n == 1  # not retried


def test_a_missing_bucket_fails_at_once_naming_it(store, caplog):
    prefix, proxy = store
    scheme = prefix.split("://")[0]
    uri = f"{scheme}://no-such-bucket-here/out/stats.json"
    with caplog.at_level(logging.WARNING, logger="mtnlg.storage"):
        with pytest.raises(storage.BucketNotFoundError, match="no-such-bucket-here"):
            storage.write_text(uri, "{}")
        with pytest.raises(storage.BucketNotFoundError, match="no-such-bucket-here"):
            storage.read_text(uri)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # nothing was retried


def test_a_fault_that_does_not_pass_gives_up_after_the_stated_attempts(store, monkeypatch):
    prefix, proxy = store
    storage.write_bytes(f"{prefix}/y.txt", b"y")
    monkeypatch.setenv("MTNLG_STORAGE_ATTEMPTS", "3")
    proxy.force = 503
    n = proxy.stats["requests"]
    with pytest.raises(storage.RemoteStorageError, match=r"failed 3 times, the last with (HTTP 503|SlowDown)") as e:
        storage.read_bytes(f"{prefix}/y.txt")
    assert f"{prefix}/y.txt" in str(e.value) and "MTNLG_STORAGE_ATTEMPTS=3" in str(e.value)
    assert proxy.stats["requests"] - n == 3


def test_a_prefix_is_removed_in_bulk_through_faults(store):
    prefix, proxy = store
    names = [f"{prefix}/ckpt/__{i}_0.distcp" for i in range(120)]
    for n in names:
        storage.write_bytes(n, b"x")
    storage.write_bytes(f"{prefix}/ckpt-other/keep.bin", b"y")
    proxy.fault_rate = 0.3
    n = proxy.stats["requests"]
    storage.remove(f"{prefix}/ckpt")
    proxy.fault_rate = 0.0
    assert storage.list_files(f"{prefix}/ckpt") == []
    assert storage.exists(f"{prefix}/ckpt-other/keep.bin")  # a sibling prefix is not touched
    # 120 objects: a listing and 2 (GCS) or 1 (S3) delete requests, plus what faults repeat
    assert proxy.stats["requests"] - n < 30, proxy.stats


def test_file_sizes_come_from_one_listing(store):
    prefix, proxy = store
    storage.write_bytes(f"{prefix}/c/a.bin", b"12345")
    storage.write_bytes(f"{prefix}/c/sub/b.bin", b"")
    storage.write_bytes(f"{prefix}/cc/not-under-c.bin", b"x")
    n = proxy.stats["requests"]
    assert storage.file_sizes(f"{prefix}/c") == {"a.bin": 5, "sub/b.bin": 0}
    assert proxy.stats["requests"] - n == 1


def test_file_sizes_of_a_local_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"123")
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    assert storage.file_sizes(str(tmp_path)) == {"a.bin": 3, "sub/b.bin": 0}
