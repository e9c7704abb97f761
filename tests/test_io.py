import os

import pytest

from mtnlg import storage

pytestmark = pytest.mark.unit


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs")


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
    if not storage.is_gcs(root):
        assert os.listdir(root) == ["out.txt"]


def test_expand_reports_missing_input(root):
    storage.write_text(storage.join(root, "d/1.txt"), "1")
    assert len(storage.expand([storage.join(root, "d")])) == 1
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        storage.expand([storage.join(root, "nothing-here/*.txt")])


def test_copy_tree_between_local_and_gcs(tmp_path, gcs):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("data")
    storage.copy_tree(str(src), gcs + "/tree")
    assert storage.read_text(gcs + "/tree/sub/f.txt") == "data"
    with storage.local_copy(gcs + "/tree") as local:
        assert open(os.path.join(local, "sub", "f.txt")).read() == "data"
