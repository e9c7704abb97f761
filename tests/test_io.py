import os

import pytest

from mtnlg import io


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs")


def test_write_read_list_glob(root):
    io.write_text(io.join(root, "a/x.txt"), "héllo")
    io.write_bytes(io.join(root, "a/b/y.bin"), b"\x00\x01")
    io.write_text(io.join(root, "c.jsonl"), "{}\n")
    assert io.read_text(io.join(root, "a/x.txt")) == "héllo"
    assert io.read_bytes(io.join(root, "a/b/y.bin")) == b"\x00\x01"
    assert io.exists(io.join(root, "a/x.txt"))
    assert not io.exists(io.join(root, "nope.txt"))
    assert io.isdir(io.join(root, "a"))
    files = io.list_files(io.join(root, "a"))
    assert [f[len(root):] for f in files] == ["/a/b/y.bin", "/a/x.txt"]
    assert [f.rsplit("/", 1)[-1] for f in io.glob(io.join(root, "*.jsonl"))] == ["c.jsonl"]
    assert len(io.glob(io.join(root, "**/*.bin"))) == 1
    assert io.size(io.join(root, "a/x.txt")) == len("héllo".encode())
    with io.open_read(io.join(root, "a/x.txt"), "r") as f:
        assert f.read() == "héllo"


def test_atomic_write_leaves_nothing_on_failure(root):
    target = io.join(root, "out.txt")
    io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_write(target, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert io.read_text(target) == "old"
    if not io.is_gcs(root):
        assert os.listdir(root) == ["out.txt"]


def test_expand_reports_missing_input(root):
    io.write_text(io.join(root, "d/1.txt"), "1")
    assert len(io.expand([io.join(root, "d")])) == 1
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        io.expand([io.join(root, "nothing-here/*.txt")])


def test_copy_tree_between_local_and_gcs(tmp_path, gcs):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("data")
    io.copy_tree(str(src), gcs + "/tree")
    assert io.read_text(gcs + "/tree/sub/f.txt") == "data"
    with io.local_copy(gcs + "/tree") as local:
        assert open(os.path.join(local, "sub", "f.txt")).read() == "data"
