import os
from pathlib import Path

import pytest

from mtnlg import storage

pytestmark = pytest.mark.unit


@pytest.fixture(params=["local", "gcs", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue(request.param)


def test_write_read_list_glob(root):
    storage.write_text(storage.join(root, "a/x.txt"), "héllo")
    storage.write_bytes(storage.join(root, "a/b/y.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "c.jsonl"), "{}\n")
    assert storage.read_text(storage.join(root, "a/x.txt")) == "héllo"
    assert storage.read_bytes(storage.join(root, "a/b/y.bin")) == b"\x00\x01"
    assert storage.exists(storage.join(root, "a/x.txt"))
    assert not storage.exists(storage.join(root, "nope.txt"))
    assert storage.isdir(storage.join(root, "a"))
    files = storage.list_files(storage.join(root, "a"))
    assert [f[len(root):] for f in files] == ["/a/b/y.bin", "/a/x.txt"]
    assert [f.rsplit("/", 1)[-1] for f in storage.glob(storage.join(root, "*.jsonl"))] == ["c.jsonl"]
    assert len(storage.glob(storage.join(root, "**/*.bin"))) == 1
    assert storage.size(storage.join(root, "a/x.txt")) == len("héllo".encode())
    with storage.open_read(storage.join(root, "a/x.txt"), "r") as f:
        assert f.read() == "héllo"


def test_atomic_write_leaves_nothing_on_failure(root):
    target = storage.join(root, "out.txt")
    storage.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(target, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert storage.read_text(target) == "old"
    if not storage.is_remote(root):
        assert os.listdir(root) == ["out.txt"]
    else:
        assert storage.list_files(root) == [target]


def test_expand_reports_missing_input(root):
    storage.write_text(storage.join(root, "d/1.txt"), "1")
    assert len(storage.expand([storage.join(root, "d")])) == 1
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        storage.expand([storage.join(root, "nothing-here/*.txt")])


@pytest.fixture(params=["gcs", "s3"])
def remote(request):
    return request.getfixturevalue(request.param)


def test_copy_tree_between_local_and_remote(tmp_path, remote):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("data")
    storage.copy_tree(str(src), remote + "/tree")
    assert storage.read_text(remote + "/tree/sub/f.txt") == "data"
    with storage.local_copy(remote + "/tree") as local:
        assert open(os.path.join(local, "sub", "f.txt")).read() == "data"
    with storage.local_copy(remote + "/tree/sub/f.txt") as local:
        assert Path(local).read_text() == "data"
    with storage.local_dir_for_output(remote + "/out") as d:
        Path(d, "g.txt").write_text("up")
    assert storage.read_text(remote + "/out/g.txt") == "up"
    storage.remove(remote + "/tree")
    assert not storage.exists(remote + "/tree") and storage.exists(remote + "/out/g.txt")


def test_open_read_seeks_and_reads_ranges(root):
    data = bytes(range(256)) * 40
    path = storage.join(root, "r.bin")
    storage.write_bytes(path, data)
    with storage.open_read(path, "rb") as f:
        assert f.read(10) == data[:10]
        f.seek(5000)
        assert f.read(300) == data[5000:5300]
        assert f.tell() == 5300
        f.seek(-6, os.SEEK_END)
        assert f.read() == data[-6:]
        assert f.read(1) == b""
    with storage.open_read(path, "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("src_kind,dst_kind", [("local", "gcs"), ("gcs", "local"), ("local", "s3"), ("s3", "local"),
                                               ("gcs", "s3"), ("s3", "gcs"), ("s3", "s3")])
def test_copy_between_every_kind_of_location(request, tmp_path, src_kind, dst_kind):
    def where(kind, name):
        base = str(tmp_path) if kind == "local" else request.getfixturevalue(kind)
        return storage.join(base, name)

    data = os.urandom(3000) + "é".encode()
    src, dst = where(src_kind, "src/a.bin"), where(dst_kind, "dst/b.bin")
    storage.write_bytes(src, data)
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == data
    assert storage.size(dst) == len(data)
    assert storage.list_files(where(dst_kind, "dst")) == [dst]


def test_s3_multipart_object_round_trips(s3, tmp_path):
    """Over the multipart threshold: uploaded in parts, visible only when complete."""
    data = os.urandom(storage._S3_CHUNK + 12345)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    storage.copy(str(local), s3 + "/big.bin")
    assert storage.size(s3 + "/big.bin") == len(data)
    storage.copy(s3 + "/big.bin", s3 + "/copy.bin")  # server-side, multipart too
    storage.copy(s3 + "/copy.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    with storage.open_read(s3 + "/copy.bin") as f:
        f.seek(storage._S3_CHUNK - 3)
        assert f.read(10) == data[storage._S3_CHUNK - 3:storage._S3_CHUNK + 7]


def test_s3_missing_object_raises_file_not_found_naming_it(s3, tmp_path):
    missing = s3 + "/no/such.txt"
    assert not storage.exists(missing) and not storage.isdir(missing)
    for call in (storage.read_bytes, storage.read_text, storage.size, storage.open_read,
                 lambda p: storage.copy(p, str(tmp_path / "x")), lambda p: storage.copy(p, s3 + "/y")):
        with pytest.raises(FileNotFoundError) as e:
            call(missing)
        assert missing in str(e.value) and not isinstance(e.value, storage.BucketNotFoundError)
    assert not (tmp_path / "x").exists() and not storage.exists(s3 + "/y")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        storage.expand([missing])


def test_s3_missing_bucket_is_named(s3_server):
    uri = "s3://mtnlg-no-such-bucket/dir/file.txt"
    assert storage.exists("s3://mtnlg-test") and not storage.exists("s3://mtnlg-no-such-bucket")
    calls = {"read_bytes": storage.read_bytes, "size": storage.size, "exists": storage.exists,
             "list_files": storage.list_files, "write_text": lambda p: storage.write_text(p, "x"),
             "open_read": storage.open_read}
    for name, call in calls.items():
        with pytest.raises(storage.BucketNotFoundError) as e:
            call(uri)
        assert uri in str(e.value) and "bucket 'mtnlg-no-such-bucket' does not exist" in str(e.value), name
        assert isinstance(e.value, FileNotFoundError)


def test_s3_refusal_raises_permission_error_naming_uri(s3):
    from botocore.stub import Stubber

    client = storage.s3_client()
    uri = s3 + "/secret.txt"
    with Stubber(client) as stub:
        stub.add_client_error("get_object", service_error_code="AccessDenied", service_message="Access Denied",
                              http_status_code=403)
        stub.add_client_error("head_object", service_error_code="403", http_status_code=403)
        with pytest.raises(PermissionError, match=r"secret\.txt: access denied .*AccessDenied: Access Denied"):
            storage.read_bytes(uri)
        with pytest.raises(PermissionError, match=r"secret\.txt: access denied"):
            storage.size(uri)
        stub.assert_no_pending_responses()


def test_s3_atomic_write_is_invisible_until_complete(s3):
    target = s3 + "/fresh.txt"
    with storage.atomic_write(target, "w") as f:
        f.write("x" * 1000)
        f.flush()
        assert not storage.exists(target)  # nothing under the final name while writing
    assert storage.read_text(target) == "x" * 1000
    with pytest.raises(RuntimeError), storage.atomic_write(s3 + "/never.txt", "wb") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert storage.list_files(s3) == [target]


def test_s3_endpoint_and_addressing_come_from_the_environment(s3_server, monkeypatch):
    for var in ("MTNLG_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(var, raising=False)
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert storage.s3_endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert storage.s3_endpoint() == "http://s3-only:2"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("MTNLG_S3_ENDPOINT_URL", s3_server)
    assert storage.s3_endpoint() == s3_server
    client = storage.s3_client()
    assert client.meta.endpoint_url == s3_server and client.meta.config.s3["addressing_style"] == "path"
    assert storage.s3_client() is client  # cached per endpoint
    monkeypatch.setenv("MTNLG_S3_ENDPOINT_URL", "minio-service.kubeflow:9000")
    with pytest.raises(ValueError, match="needs its scheme"):
        storage.s3_client()
    monkeypatch.setenv("MTNLG_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("MTNLG_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(ValueError, match="MTNLG_S3_ADDRESSING_STYLE"):
        storage.s3_client()


def test_uri_helpers():
    assert storage.is_remote("gs://b/k") and storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/s3:")
    assert storage.is_s3("s3://b") and not storage.is_s3("gs://b") and not storage.is_gcs("s3://b")
    assert storage.split_s3("s3://b/a/c") == ("b", "a/c") == storage.split_uri("gs://b/a/c")
    assert storage.join("s3://b/x/", "y", "/z") == "s3://b/x/y/z"
    with pytest.raises(ValueError, match="not an s3:// URI"):
        storage.split_s3("gs://b/k")
    with pytest.raises(ValueError, match="without a bucket"):
        storage.split_uri("s3:///k")
    with pytest.raises(ValueError, match="not a local path"):
        storage.local_path("s3://b/k")


def test_s3_reads_are_pinned_to_the_object_opened(s3):
    """An object replaced while open is not read half old, half new."""
    path = s3 + "/v.bin"
    storage.write_bytes(path, b"a" * 100)
    raw = storage._S3Reader(path)
    assert raw.read(10) == b"a" * 10
    storage.write_bytes(path, b"b" * 100)
    with pytest.raises(storage.RemoteStorageError, match=r"v\.bin: .*PreconditionFailed"):
        raw.read(10)
    assert storage.read_bytes(path) == b"b" * 100


def test_s3_missing_object_and_bucket_are_not_retried(s3):
    sent = []

    def count(request, **_):
        sent.append(request.method)

    client = storage.s3_client()
    client.meta.events.register("before-send.s3", count)
    try:
        for uri in (s3 + "/none.txt", "s3://mtnlg-no-such-bucket/none.txt"):
            sent.clear()
            with pytest.raises(FileNotFoundError, match="none.txt"):
                storage.read_bytes(uri)
            assert sent == ["GET"], uri  # one request: a 404 is an answer, not a failure to retry
    finally:
        client.meta.events.unregister("before-send.s3", count)
