"""The Megatron-LM MMapIndexedDataset format: exact bytes, reading, and refusing bad files."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from mtnlg.formats.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, dtype_code, token_dtype

pytestmark = pytest.mark.unit

DOCS = [[5, 6, 7, 2], [9, 2], [65535, 0, 1, 2], [2]]


def _write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)
    return str(prefix)


def megatron_read(prefix):
    """An independent reader following Megatron-LM's ``_IndexReader`` / ``IndexedDataset``."""
    dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
              6: np.float64, 7: np.float32, 8: np.uint16}
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        assert struct.unpack("<Q", f.read(8)) == (1,)
        (code,) = struct.unpack("<B", f.read(1))
        dtype = dtypes[code]
        (seq_count,) = struct.unpack("<Q", f.read(8))
        (doc_count,) = struct.unpack("<Q", f.read(8))
        offset = f.tell()
    buf = memoryview(np.memmap(prefix + ".idx", mode="r", order="C"))
    lengths = np.frombuffer(buf, dtype=np.int32, count=seq_count, offset=offset)
    pointers = np.frombuffer(buf, dtype=np.int64, count=seq_count, offset=offset + lengths.nbytes)
    doc_idx = np.frombuffer(buf, dtype=np.int64, count=doc_count,
                            offset=offset + lengths.nbytes + pointers.nbytes)
    bin_buf = memoryview(np.memmap(prefix + ".bin", mode="r", order="C"))
    seqs = [np.frombuffer(bin_buf, dtype=dtype, count=int(n), offset=int(p))
            for n, p in zip(lengths, pointers)]
    return dtype, seqs, doc_idx


def test_header_bytes_exactly(tmp_path):
    prefix = _write(tmp_path / "d", DOCS)
    raw = open(prefix + ".idx", "rb").read()
    n = len(DOCS)
    assert raw[0:9] == b"MMIDIDX\x00\x00"
    assert raw[9:17] == b"\x01\x00\x00\x00\x00\x00\x00\x00"  # version 1, uint64 LE
    assert raw[17:18] == b"\x08"  # uint16
    assert raw[18:26] == n.to_bytes(8, "little")  # sequence count
    assert raw[26:34] == (n + 1).to_bytes(8, "little")  # document count = docs + 1
    lens = [len(d) for d in DOCS]
    off = 34
    assert raw[off:off + 4 * n] == b"".join(x.to_bytes(4, "little", signed=True) for x in lens)
    off += 4 * n
    ptrs, acc = [], 0
    for x in lens:
        ptrs.append(acc)
        acc += 2 * x  # byte offsets: uint16 tokens
    assert raw[off:off + 8 * n] == b"".join(p.to_bytes(8, "little", signed=True) for p in ptrs)
    off += 8 * n
    assert raw[off:] == b"".join(i.to_bytes(8, "little", signed=True) for i in range(n + 1))
    data = open(prefix + ".bin", "rb").read()
    assert data == b"".join(t.to_bytes(2, "little") for d in DOCS for t in d)


@pytest.mark.parametrize("dtype,code", [(np.uint8, 1), (np.int8, 2), (np.int16, 3), (np.int32, 4),
                                        (np.int64, 5), (np.float64, 6), (np.float32, 7),
                                        (np.uint16, 8)])
def test_dtype_codes(tmp_path, dtype, code):
    assert dtype_code(dtype) == code
    prefix = _write(tmp_path / "d", [[1, 2, 3], [4]], dtype)
    assert open(prefix + ".idx", "rb").read()[17] == code
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert ds[0].tolist() == [1, 2, 3] and ds[1].tolist() == [4]


def test_token_dtype_choice():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32


def test_reader_matches_independent_megatron_reader(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, size=int(n)) for n in rng.integers(1, 300, size=200)]
    prefix = str(tmp_path / "d")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_documents(np.concatenate(docs[:150]), np.array([len(d) for d in docs[:150]]))
        for d in docs[150:]:
            b.add_document(d)
    dtype, seqs, doc_idx = megatron_read(prefix)
    ds = IndexedDataset(prefix)
    ds.check()
    assert dtype == np.uint16 and len(seqs) == len(docs) == len(ds)
    assert doc_idx.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(seqs[i], d) and np.array_equal(ds[i], d)
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.get(3, 2, 5).tolist() == docs[3][2:7].tolist()
    assert np.array_equal(ds[-1], docs[-1])
    with pytest.raises(IndexError):
        ds.get(0, 0, len(docs[0]) + 1)
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_streaming_many_chunks_and_permissions(tmp_path, monkeypatch):
    """The index is written in chunks; chunk edges must not change a byte."""
    import mtnlg.formats.indexed_dataset as mod

    docs = [[i % 7 + 1] * (i % 5 + 1) for i in range(1000)]
    ref = _write(tmp_path / "ref", docs)
    monkeypatch.setattr(mod, "_CHUNK", 7)
    small = _write(tmp_path / "small", docs)
    for ext in (".idx", ".bin"):
        assert open(ref + ext, "rb").read() == open(small + ext, "rb").read()
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(ref + ".bin").st_mode & 0o777 == 0o666 & ~mask


def test_empty_dataset_is_valid(tmp_path):
    prefix = _write(tmp_path / "e", [])
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0
    assert open(prefix + ".idx", "rb").read()[18:34] == (0).to_bytes(8, "little") + (1).to_bytes(8, "little")


def test_failed_build_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document([1, 2])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_builder_rejects_bad_input(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        b.add_document(np.array([70000], dtype=np.int64))
    with pytest.raises(ValueError, match="sum to 3"):
        b.add_documents(np.array([1, 2], dtype=np.uint16), np.array([3]))
    b.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="no Megatron"):
        IndexedDatasetBuilder(str(tmp_path / "y"), np.uint32)


def test_truncated_idx_is_an_error_naming_the_file(tmp_path):
    prefix = _write(tmp_path / "d", DOCS)
    raw = open(prefix + ".idx", "rb").read()
    for cut in (len(raw) - 1, 40, 20, 0):
        with open(prefix + ".idx", "wb") as f:
            f.write(raw[:cut])
        with pytest.raises(ValueError, match=r"d\.idx is truncated"):
            IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(raw + b"\x00" * 8)
    with pytest.raises(ValueError, match="unexpected bytes"):
        IndexedDataset(prefix)


def test_truncated_bin_and_foreign_files(tmp_path):
    prefix = _write(tmp_path / "d", DOCS)
    data = open(prefix + ".bin", "rb").read()
    with open(prefix + ".bin", "wb") as f:
        f.write(data[:-2])
    with pytest.raises(ValueError, match=r"d\.bin is truncated"):
        IndexedDataset(prefix)
    with open(prefix + ".bin", "wb") as f:
        f.write(data + b"\x00\x00")
    with pytest.raises(ValueError, match=r"d\.bin is longer than its index says"):
        IndexedDataset(prefix)
    with open(prefix + ".bin", "wb") as f:
        f.write(data)
    raw = bytearray(open(prefix + ".idx", "rb").read())
    bad = bytearray(raw)
    bad[:9] = b"NOTMEGAT\x00"
    open(prefix + ".idx", "wb").write(bytes(bad))
    with pytest.raises(ValueError, match="not a Megatron indexed-dataset index"):
        IndexedDataset(prefix)
    bad = bytearray(raw)
    bad[9] = 2
    open(prefix + ".idx", "wb").write(bytes(bad))
    with pytest.raises(ValueError, match="unsupported index version 2"):
        IndexedDataset(prefix)
    bad = bytearray(raw)
    bad[17] = 42
    open(prefix + ".idx", "wb").write(bytes(bad))
    with pytest.raises(ValueError, match="unknown dtype code 42"):
        IndexedDataset(prefix)
    os.remove(prefix + ".idx")
    with pytest.raises(FileNotFoundError, match=r"d\.idx does not exist"):
        IndexedDataset(prefix)
