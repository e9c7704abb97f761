"""GPT sample index: coverage, sharding, determinism, resume, caching, blending."""

from __future__ import annotations

import os

import numpy as np
import pytest

import mtnlg.train.gpt_dataset as gd
from mtnlg import storage
from mtnlg.formats.indexed_dataset import IndexedDatasetBuilder
from mtnlg.train.gpt_dataset import BlendedDataset, GPTDataset, build_epoch_index

pytestmark = pytest.mark.unit

SEQ = 16


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTNLG_CACHE_DIR", str(tmp_path / "cache"))


def _unique_tokens(prefix, n_docs=300, seed=0, max_len=40):
    """Documents whose token values are their positions in the file: every token is unique."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=n_docs)
    tokens = np.arange(int(lengths.sum()), dtype=np.int32)
    with IndexedDatasetBuilder(str(prefix), np.int32) as b:
        b.add_documents(tokens, lengths)
    return str(prefix), lengths


def _epoch_samples(ds, epoch):
    n = len(ds)
    return np.stack([ds[i] for i in range(epoch * n, (epoch + 1) * n)])  # (n, SEQ+1)


def test_every_token_once_per_epoch(tmp_path):
    prefix, lengths = _unique_tokens(tmp_path / "d")
    total = int(lengths.sum())
    ds = GPTDataset(prefix, SEQ, seed=1)
    assert len(ds) == (total - 1) // SEQ
    for epoch in (0, 1):
        samples = _epoch_samples(ds, epoch)
        assert samples.dtype == np.int64 and samples.shape == (len(ds), SEQ + 1)
        inputs = samples[:, :SEQ].reshape(-1)
        # no token is an input twice, and all but the epoch's short tail are inputs
        assert np.unique(inputs).size == inputs.size == len(ds) * SEQ
        assert 0 < total - inputs.size <= SEQ
        # the label column continues the stream: each window's last token starts the next one
        firsts = set(samples[:, 0].tolist())
        assert sum(t in firsts for t in samples[:, SEQ].tolist()) == len(ds) - 1
    # the shuffled stream keeps each document's tokens in order and contiguous
    doc_idx, sample_idx, shuffle_idx = build_epoch_index(lengths, SEQ, 1, 0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stream = np.concatenate([np.arange(starts[d], starts[d] + lengths[d]) for d in doc_idx])
    k = int(shuffle_idx[5])
    assert np.array_equal(ds[5], stream[k * SEQ:(k + 1) * SEQ + 1])


def test_seed_and_epoch_change_order_but_not_content(tmp_path):
    prefix, _ = _unique_tokens(tmp_path / "d")
    a, b, c = GPTDataset(prefix, SEQ, 1), GPTDataset(prefix, SEQ, 1), GPTDataset(prefix, SEQ, 2)
    ea, eb, ec = _epoch_samples(a, 0), _epoch_samples(b, 0), _epoch_samples(c, 0)
    assert np.array_equal(ea, eb)
    assert not np.array_equal(ea, ec)
    e1 = _epoch_samples(a, 1)
    assert not np.array_equal(ea, e1)
    assert e1.shape == ea.shape


def test_dp_ranks_split_the_global_batch_without_overlap(tmp_path):
    prefix, _ = _unique_tokens(tmp_path / "d")
    ds = GPTDataset(prefix, SEQ, seed=3)
    gbs, dp = 12, 3
    for start in (0, 36, len(ds) - 5):  # the last one straddles an epoch boundary
        full = ds.global_batch(start, gbs, 0, 1)
        parts = [ds.global_batch(start, gbs, r, dp) for r in range(dp)]
        assert all(p.shape == (gbs // dp, SEQ + 1) for p in parts)
        assert np.array_equal(np.concatenate(parts), full)
        ids = [set(p[:, :SEQ].reshape(-1).tolist()) for p in parts]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        assert np.array_equal(full, np.stack([ds[i] for i in range(start, start + gbs)]))
    with pytest.raises(ValueError, match="not divisible"):
        ds.global_batch(0, 10, 0, 3)
    with pytest.raises(ValueError, match="dp_rank 3"):
        ds.global_batch(0, 12, 3, 3)
    with pytest.raises(IndexError):
        ds[-1]


def test_resume_from_any_sample_gives_the_same_stream(tmp_path):
    prefix, _ = _unique_tokens(tmp_path / "d")
    gbs, steps = 8, 60  # more than one epoch
    first = GPTDataset(prefix, SEQ, seed=7)
    stream = [first.global_batch(s * gbs, gbs, 1, 2) for s in range(steps)]
    k = 37
    resumed = GPTDataset(prefix, SEQ, seed=7)  # a new process would build the same index
    for s in range(k, steps):
        assert np.array_equal(resumed.global_batch(s * gbs, gbs, 1, 2), stream[s])


def test_index_cache_written_beside_data_and_reused(tmp_path, monkeypatch):
    # enough documents and samples to be worth caching
    prefix, _ = _unique_tokens(tmp_path / "big", n_docs=gd.CACHE_MIN_ENTRIES + 10, max_len=4)
    ds = GPTDataset(prefix, 4, seed=5)
    cache = prefix + ".index-cache"
    entries = os.listdir(cache)
    assert entries == [ds.cache_key(0)] and entries[0].startswith("seq4-seed5-epoch0-")
    assert sorted(os.listdir(os.path.join(cache, entries[0]))) == [
        "doc_idx.npy", "sample_idx.npy", "shuffle_idx.npy"]
    expect = [ds[i].copy() for i in (0, 1, 12345)]

    def fail(*a, **k):
        raise AssertionError("index rebuilt although cached")

    monkeypatch.setattr(gd, "build_epoch_index", fail)
    again = GPTDataset(prefix, 4, seed=5)
    assert all(np.array_equal(again[i], e) for i, e in zip((0, 1, 12345), expect))
    with pytest.raises(AssertionError, match="rebuilt"):
        GPTDataset(prefix, 4, seed=6)  # another seed is another index


def test_cache_falls_back_to_local_dir_when_data_dir_unwritable(tmp_path, monkeypatch):
    prefix, _ = _unique_tokens(tmp_path / "big", n_docs=gd.CACHE_MIN_ENTRIES + 10, max_len=4)
    with open(prefix + ".index-cache", "w") as f:  # a file where the cache directory would go
        f.write("in the way")
    ds = GPTDataset(prefix, 4, seed=5)
    root = tmp_path / "cache" / "gpt-index"
    (sub,) = os.listdir(root)
    assert os.listdir(root / sub) == [ds.cache_key(0)]
    monkeypatch.setattr(gd, "build_epoch_index", lambda *a: pytest.fail("not reused"))
    assert np.array_equal(GPTDataset(prefix, 4, seed=5)[3], ds[3])


def test_small_index_stays_in_memory(tmp_path):
    prefix, _ = _unique_tokens(tmp_path / "d")
    GPTDataset(prefix, SEQ, seed=1)[10 * 300]
    assert not os.path.exists(prefix + ".index-cache")


def test_gcs_data(tmp_path, gcs):
    _remote_data(tmp_path, gcs)


def test_s3_data(tmp_path, s3, monkeypatch):
    monkeypatch.setenv("MTNLG_CACHE_DIR", str(tmp_path / "cache"))
    _remote_data(tmp_path, s3)
    assert os.listdir(tmp_path / "cache" / "data")  # downloaded once into the local cache


def test_a_node_downloads_and_indexes_once(tmp_path, gcs, monkeypatch):
    # open_datasets_per_node: the node's local rank 0 downloads the gs:// data and builds
    # the (cached) sample index; the node's other ranks, after the barrier, find both
    from mtnlg.train.config import DataConfig
    from mtnlg.train.data import open_datasets_per_node

    monkeypatch.setenv("MTNLG_CACHE_DIR", str(tmp_path / "cache"))
    prefix, _ = _unique_tokens(tmp_path / "big", n_docs=gd.CACHE_MIN_ENTRIES + 10, max_len=4)
    for ext in (".bin", ".idx"):
        storage.copy(prefix + ext, storage.join(gcs, "tok", "train" + ext))
    copies, builds = [], []
    real_copy, real_build = storage.copy, gd.build_epoch_index
    monkeypatch.setattr(storage, "copy", lambda *a, **k: (copies.append(a[0]), real_copy(*a, **k))[1])
    monkeypatch.setattr(gd, "build_epoch_index", lambda *a, **k: (builds.append(1), real_build(*a, **k))[1])
    data = DataConfig(path=storage.join(gcs, "tok"))
    first, _ = open_datasets_per_node(data, 4, False, local_rank=0)
    assert len(copies) == 2 and len(builds) == 1  # .bin + .idx, one index
    other, _ = open_datasets_per_node(data, 4, False, local_rank=1)
    assert len(copies) == 2 and len(builds) == 1  # nothing again
    assert np.array_equal(other.global_batch(8, 8, 1, 2), first.global_batch(8, 8, 1, 2))


def _remote_data(tmp_path, root: str) -> None:
    prefix, _ = _unique_tokens(tmp_path / "d")
    for ext in (".bin", ".idx"):
        storage.copy(prefix + ext, storage.join(root, "tok", "train" + ext))
    remote = GPTDataset(storage.join(root, "tok", "train"), SEQ, seed=2)
    local = GPTDataset(prefix, SEQ, seed=2)
    assert len(remote) == len(local)
    assert np.array_equal(remote.global_batch(4, 8, 0, 2), local.global_batch(4, 8, 0, 2))
    with pytest.raises(FileNotFoundError, match=r"nothing\.(bin|idx) does not exist"):
        GPTDataset(storage.join(root, "tok", "nothing"), SEQ, seed=2)


def test_too_little_data(tmp_path):
    prefix, lengths = _unique_tokens(tmp_path / "d", n_docs=2, max_len=4)
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTDataset(prefix, int(lengths.sum()), seed=0)
    ds = GPTDataset(prefix, int(lengths.sum()) - 1, seed=0)  # exactly one sample per epoch
    assert len(ds) == 1 and ds[3].size == lengths.sum()


def test_blend_follows_weights_and_each_dataset_order(tmp_path):
    pa, la = _unique_tokens(tmp_path / "a", seed=1)
    pb, lb = _unique_tokens(tmp_path / "b", n_docs=100, seed=2)
    a, b = GPTDataset(pa, SEQ, 1), GPTDataset(pb, SEQ, 1)
    blend = BlendedDataset([a, b], [3.0, 1.0], seed=9)
    n = 4000
    src = [blend.source(i) for i in range(n)]
    counts = np.bincount([d for d, _ in src], minlength=2)
    assert abs(counts[0] - 0.75 * n) <= 2 and abs(counts[1] - 0.25 * n) <= 2
    # every window of 40 samples is close to 3:1 (smooth interleave, not blocks)
    firsts = np.array([d for d, _ in src]).reshape(-1, 40)
    assert np.all(np.abs(firsts.sum(axis=1) - 10) <= 2)
    # dataset d serves its samples 0, 1, 2, ... in turn
    for d in (0, 1):
        assert [j for dd, j in src if dd == d] == list(range(counts[d]))
    assert np.array_equal(blend[5], (a if src[5][0] == 0 else b)[src[5][1]])
    # same seed, same blend; crosses the period boundary seamlessly
    again = BlendedDataset([a, b], [3.0, 1.0], seed=9)
    assert np.array_equal(again.global_batch(100, 8, 1, 2), blend.global_batch(100, 8, 1, 2))
    p = gd.BLEND_PERIOD
    assert blend.source(p + 7) == (blend.source(7)[0],
                                   int(blend.period_counts[blend.source(7)[0]]) + blend.source(7)[1])
    with pytest.raises(ValueError, match="weights"):
        BlendedDataset([a, b], [1.0, 0.0], seed=0)
    with pytest.raises(ValueError, match="seq_length"):
        BlendedDataset([a, GPTDataset(pb, SEQ + 1, 1)], [1, 1], seed=0)
