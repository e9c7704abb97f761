"""GPT training samples over an indexed dataset: fixed-length windows of a shuffled token stream.

Each epoch concatenates every document, in an order shuffled per (seed, epoch), into one
token stream and cuts it into ``samples_per_epoch = (tokens - 1) // seq_length`` windows of
``seq_length + 1`` tokens (inputs plus the next-token labels; consecutive windows share one
token, and samples cross document boundaries). The windows are then visited in a shuffled
order. Three arrays describe an epoch, as in Megatron-LM's ``GPTDataset``:

* ``doc_idx``     (D,)      documents in stream order;
* ``sample_idx``  (S+1, 2)  where window k starts: (position in doc_idx, token offset), so
                            window k runs from entry k to entry k+1, both ends included;
* ``shuffle_idx`` (S,)      the order in which windows are served.

They are built with vectorised numpy (a cumulative sum and one ``searchsorted``), once per
(data, seq_length, seed, epoch), and cached as ``.npy`` files in ``<prefix>.index-cache/``
beside the data, keyed by a hash of those parameters; where that directory cannot be written
(a read-only mount, gs:// or s3:// data) the cache goes to ``$MTNLG_CACHE_DIR`` (default
``~/.cache/mtnlg``). Indices of fewer than ``CACHE_MIN_ENTRIES`` documents and samples build
in milliseconds and stay in memory (a tiny dataset trained for many epochs would otherwise
leave a cache entry per epoch). Sample ``i`` for any ``i >= 0`` is window ``shuffle_idx[i % S]`` of epoch
``i // S``, so a run resumes exactly by passing the number of samples it consumed.

Per epoch, every token of the split lies in exactly one window's inputs, except the last
``tokens - S * seq_length`` (fewer than ``seq_length + 1``) tokens of that epoch's stream.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from mtnlg import storage
from mtnlg.formats.indexed_dataset import IndexedDataset, data_path, index_path
from mtnlg.progress import get_logger

log = get_logger("mtnlg.train.gpt_dataset")

INDEX_FORMAT = 1  # bump when the index construction changes: old caches are then ignored
CACHE_MIN_ENTRIES = 1 << 16  # smaller indices build in milliseconds: kept in memory, not cached
BLEND_PERIOD = 1 << 20  # the blend's dataset choice repeats with this period (exact weights per period)
_INDEX_FILES = ("doc_idx", "sample_idx", "shuffle_idx")


def cache_root() -> str:
    """The local cache directory used when the data's own directory cannot hold the index."""
    return os.environ.get("MTNLG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mtnlg")


def _index_dtype(n: int):
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def build_epoch_index(sizes: np.ndarray, seq_length: int, seed: int, epoch: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(doc_idx, sample_idx, shuffle_idx)`` of one epoch (see the module docstring).

    ``sizes`` (D,) are the document lengths in tokens. No Python loop over documents, samples
    or tokens: O(D + S log D) in numpy.
    """
    sizes = np.asarray(sizes)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    n_docs = int(sizes.size)
    doc_idx = rng.permutation(n_docs).astype(_index_dtype(n_docs))  # (D,)
    lens = sizes[doc_idx].astype(np.int64)  # (D,) lengths in stream order
    ends = np.cumsum(lens)  # (D,) stream position one past each document
    total = int(ends[-1]) if n_docs else 0
    if total < seq_length + 1:
        raise ValueError(f"{total} tokens cannot fill one sample of seq_length {seq_length} + 1")
    n_samples = (total - 1) // seq_length
    pos = np.arange(n_samples + 1, dtype=np.int64) * seq_length  # (S+1,) window starts
    doc = np.searchsorted(ends, pos, side="right")  # (S+1,) first document ending after pos
    offset = pos - (ends[doc] - lens[doc])  # (S+1,) token offset inside that document
    dt = _index_dtype(max(n_docs, int(sizes.max())))
    sample_idx = np.stack([doc, offset], axis=1).astype(dt)  # (S+1, 2)
    shuffle_idx = rng.permutation(n_samples).astype(_index_dtype(n_samples))  # (S,)
    return doc_idx, sample_idx, shuffle_idx


class _SampleSource:
    """What the trainer uses: ``ds[i]`` for any ``i >= 0`` and ``global_batch``."""

    seq_length: int

    def __getitem__(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def global_batch(self, start_sample: int, global_batch_size: int, dp_rank: int,
                     dp_size: int) -> np.ndarray:
        """This rank's contiguous share of samples [start_sample, start_sample + global_batch_size).

        Rank r gets samples ``start_sample + r * b + [0, b)`` with ``b = global_batch_size //
        dp_size`` (Megatron's pretraining sampler), so ranks never overlap and resuming is
        passing the consumed-sample count. Returns int64 ``(b, seq_length + 1)``.
        """
        if global_batch_size < 1 or dp_size < 1:
            raise ValueError(f"global_batch_size ({global_batch_size}) and dp_size ({dp_size}) "
                             "must be positive")
        if global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                             f"dp_size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        per_rank = global_batch_size // dp_size
        first = start_sample + dp_rank * per_rank
        out = np.empty((per_rank, self.seq_length + 1), dtype=np.int64)  # (b, T+1)
        for row, i in enumerate(range(first, first + per_rank)):
            out[row] = self[i]
        return out


class GPTDataset(_SampleSource):
    """Samples of ``seq_length + 1`` tokens from ``<prefix>.bin/.idx`` (local, gs:// or s3://)."""

    def __init__(self, prefix: str, seq_length: int, seed: int, cache_dir: str | None = None):
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.prefix = str(prefix)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        local = self._local_prefix(self.prefix)
        self.data = IndexedDataset(local)
        self.num_tokens = int(self.data.num_tokens)
        if self.num_tokens < self.seq_length + 1:
            raise ValueError(f"{index_path(local)} holds {self.num_tokens} tokens, fewer than one "
                             f"sample needs (seq_length {self.seq_length} + 1)")
        self.samples_per_epoch = (self.num_tokens - 1) // self.seq_length
        digest = hashlib.blake2b(np.ascontiguousarray(self.data.sizes).data, digest_size=16)
        digest.update(str(self.data.dtype).encode())
        self._data_digest = digest.hexdigest()
        name = os.path.basename(local)
        if cache_dir is not None:
            self._cache_dirs = [cache_dir]
        else:
            beside = [] if storage.is_remote(self.prefix) else [local + ".index-cache"]
            self._cache_dirs = beside + [
                os.path.join(cache_root(), "gpt-index", f"{name}-{self._data_digest[:16]}")]
        self._epochs: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._epoch(0)  # build or load now: errors surface at construction

    @staticmethod
    def _local_prefix(prefix: str) -> str:
        """gs:// and s3:// data is downloaded once into the local cache (reused while its size matches)."""
        if not storage.is_remote(prefix):
            return prefix
        key = hashlib.sha256(prefix.encode()).hexdigest()[:16]
        local = os.path.join(cache_root(), "data", key, os.path.basename(prefix))
        for src, dst in ((data_path(prefix), data_path(local)), (index_path(prefix), index_path(local))):
            if not storage.exists(src):
                raise FileNotFoundError(f"indexed dataset file {src} does not exist")
            if not (os.path.exists(dst) and os.path.getsize(dst) == storage.size(src)):
                log.info("downloading %s to %s", src, dst)
                storage.copy(src, dst)
        return local

    def __len__(self) -> int:
        return self.samples_per_epoch

    def cache_key(self, epoch: int) -> str:
        """Readable, unique name of an epoch's index: parameters plus a hash of everything."""
        params = {"format": INDEX_FORMAT, "data": self._data_digest, "tokens": self.num_tokens,
                  "documents": len(self.data), "seq_length": self.seq_length, "seed": self.seed,
                  "epoch": epoch}
        h = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        return f"seq{self.seq_length}-seed{self.seed}-epoch{epoch}-{h}"

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        arrays = self._load_or_build(epoch)
        self._epochs[epoch] = arrays
        while len(self._epochs) > 2:  # a global batch can straddle two epochs
            self._epochs.popitem(last=False)
        return arrays

    def _load_or_build(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key = self.cache_key(epoch)
        for root in self._cache_dirs:
            path = os.path.join(root, key)
            if all(os.path.exists(os.path.join(path, f + ".npy")) for f in _INDEX_FILES):
                try:
                    arrays = tuple(np.load(os.path.join(path, f + ".npy"), mmap_mode="r",
                                           allow_pickle=False) for f in _INDEX_FILES)
                except (OSError, ValueError) as e:
                    log.warning("ignoring unreadable sample-index cache %s (%s)", path, e)
                    continue
                if arrays[1].shape == (self.samples_per_epoch + 1, 2):
                    return arrays
                log.warning("ignoring sample-index cache %s: it does not match the data", path)
        t0 = time.perf_counter()
        arrays = build_epoch_index(self.data.sizes, self.seq_length, self.seed, epoch)
        if max(len(self.data), self.samples_per_epoch) < CACHE_MIN_ENTRIES:
            return arrays
        log.info("built the sample index of %s, epoch %d: %d samples over %d documents in %.2fs",
                 self.prefix, epoch, self.samples_per_epoch, len(self.data), time.perf_counter() - t0)
        for root in self._cache_dirs:
            try:
                self._save(root, key, arrays)
                return arrays
            except OSError as e:
                log.info("cannot cache the sample index in %s (%s); trying the next place", root, e)
        log.warning("sample index for %s kept in memory only: no cache directory is writable",
                    self.prefix)
        return arrays

    @staticmethod
    def _save(root: str, key: str, arrays) -> None:
        """Write the three arrays into a temporary directory, then rename it into place."""
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, key)
        tmp = tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root)
        try:
            for name, arr in zip(_INDEX_FILES, arrays):
                np.save(os.path.join(tmp, name + ".npy"), arr)
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):  # not another rank's identical index: a real error
                    raise
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample ``i`` (any ``i >= 0``): int64 ``(seq_length + 1,)``."""
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, j = divmod(i, self.samples_per_epoch)
        doc_idx, sample_idx, shuffle_idx = self._epoch(epoch)
        k = int(shuffle_idx[j])
        d0, o0 = (int(x) for x in sample_idx[k])
        d1, o1 = (int(x) for x in sample_idx[k + 1])
        if d0 == d1:
            return self.data.get(int(doc_idx[d0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [self.data.get(int(doc_idx[d0]), o0)]
        parts += [self.data[int(doc_idx[d])] for d in range(d0 + 1, d1)]
        parts.append(self.data.get(int(doc_idx[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __repr__(self) -> str:
        return (f"GPTDataset({self.prefix!r}, seq_length={self.seq_length}, seed={self.seed}, "
                f"samples_per_epoch={self.samples_per_epoch})")


class BlendedDataset(_SampleSource):
    """Samples drawn from several datasets in fixed proportions.

    The choice of dataset for sample ``i`` is a smooth interleave (each dataset's k-th sample
    sits at time ``(k + u_d) / w_d``, with a seeded phase ``u_d``, and samples are taken in
    time order), computed once for a period of ``BLEND_PERIOD`` samples and repeated; within
    each period the counts match the weights to within one sample. Dataset ``d`` serves its
    own samples 0, 1, 2, ... in turn, so each keeps its epoch order.
    """

    def __init__(self, datasets: list, weights: list[float], seed: int):
        if not datasets:
            raise ValueError("BlendedDataset needs at least one dataset")
        if len(weights) != len(datasets):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be finite and > 0, got {list(weights)}")
        lengths = {d.seq_length for d in datasets}
        if len(lengths) != 1:
            raise ValueError(f"blended datasets have different seq_length: {sorted(lengths)}")
        self.datasets = list(datasets)
        self.seq_length = lengths.pop()
        self.weights = w / w.sum()
        self.seed = int(seed)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0xB1E4D])))
        phase = rng.random(len(datasets))
        times, labels, ranks = [], [], []
        for d, (wd, ud) in enumerate(zip(self.weights, phase)):
            k = np.arange(int(np.ceil(BLEND_PERIOD * wd)) + 2, dtype=np.int64)
            times.append((k + ud) / wd)
            labels.append(np.full(k.size, d, dtype=np.int32))
            ranks.append(k)
        order = np.argsort(np.concatenate(times), kind="stable")[:BLEND_PERIOD]
        self.dataset_index = np.concatenate(labels)[order]  # (P,) which dataset serves sample i
        self.dataset_sample_index = np.concatenate(ranks)[order]  # (P,) its sample number
        self.period_counts = np.bincount(self.dataset_index, minlength=len(datasets))  # (n,)

    def __len__(self) -> int:
        """The datasets' samples per epoch, summed (indices beyond it are valid too)."""
        return sum(len(d) for d in self.datasets)

    def source(self, i: int) -> tuple[int, int]:
        """``(dataset number, sample number in that dataset)`` of blended sample ``i``."""
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        q, r = divmod(i, BLEND_PERIOD)
        d = int(self.dataset_index[r])
        return d, q * int(self.period_counts[d]) + int(self.dataset_sample_index[r])

    def __getitem__(self, i: int) -> np.ndarray:
        d, j = self.source(i)
        return self.datasets[d][j]
