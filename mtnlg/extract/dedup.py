"""Deduplication primitives: exact text hashes, MinHash signatures, LSH bands, clustering.

Exact: two documents are duplicates when their case-folded, single-spaced texts are equal
(a 128-bit BLAKE2b hash of that form). Fuzzy (Broder 1997; as MT-NLG did, Jaccard >= 0.8):
each document becomes the set of its word n-grams ("shingles"); ``num_perm`` hash functions
``h_i(x) = (a_i * x + b_i) mod 2**64 >> 32`` (multiply-shift, odd ``a_i``) each keep the
minimum over the set, and the fraction of equal minima estimates the Jaccard similarity.
LSH cuts the signature into ``bands`` of ``rows`` values; documents sharing a whole band
become candidate pairs, which are then verified against the threshold. Verified pairs are
edges of a graph; in each connected component the document with the smallest id is kept.
Nothing here depends on process, worker count or arrival order, so the result is the same
however the work is split.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from typing import Iterable, Iterator

import numpy as np

from mtnlg.extract.clean import normalize_for_hash

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) to combine word hashes
_CHUNK = 4096  # shingles per block: bounds the (shingles, num_perm) temporary to 4 MiB per 128 perms


def text_hash(text: str) -> bytes:
    """16-byte hash of the text's normalised form; equal for exact duplicates."""
    return hashlib.blake2b(normalize_for_hash(text).encode("utf-8"), digest_size=16).digest()


class MinHasher:
    """MinHash signatures over word n-grams; the same ``seed`` gives the same hash functions."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        self.num_perm, self.ngram = num_perm, ngram
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """Distinct 64-bit hashes of the text's word n-grams (case-folded); (S,) uint64."""
        words = text.casefold().split()
        if not words:
            return np.zeros(0, dtype=np.uint64)
        cache: dict[str, int] = {}
        ids = [cache.setdefault(w, len(cache)) for w in words]
        # Word hashes: CRC-32 of the word twice with different seeds -> 64 bits, stable
        # across processes (unlike Python's salted hash()).
        vocab = np.array([zlib.crc32(w.encode("utf-8")) | (zlib.crc32(w.encode("utf-8"), 0x5EED) << 32)
                          for w in cache], dtype=np.uint64)
        wh = vocab[np.asarray(ids, dtype=np.int64)]  # (W,)
        n = min(self.ngram, len(wh))
        # Polynomial combination of n consecutive word hashes (wrapping uint64 arithmetic).
        sh = wh[: len(wh) - n + 1].copy()  # (W-n+1,)
        for k in range(1, n):
            sh = sh * _MIX + wh[k: len(wh) - n + 1 + k]
        return np.unique(sh)

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 minima; all 0xFFFFFFFF for a text without words."""
        sh = self.shingles(text)
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        buf = np.empty((min(len(sh), _CHUNK), self.num_perm), dtype=np.uint64)
        shift = np.uint64(32)
        for i in range(0, len(sh), _CHUNK):
            x = sh[i:i + _CHUNK, None]  # (S, 1)
            block = buf[: len(x)]  # (S, P), reused: no allocation per chunk
            np.multiply(x, self.a[None, :], out=block)  # wraps mod 2**64, as intended
            np.add(block, self.b[None, :], out=block)
            np.right_shift(block, shift, out=block)
            np.minimum(sig, block.min(axis=0), out=sig)
        return sig.astype(np.uint32)


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal MinHash values: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def band_keys(sig: np.ndarray, bands: int) -> list[bytes]:
    """One key per band: the band index and the band's values; equal keys = shared band."""
    rows = len(sig) // bands
    raw = sig.astype("<u4").tobytes()
    return [i.to_bytes(2, "little") + raw[i * rows * 4:(i + 1) * rows * 4] for i in range(bands)]


def candidate_pairs(ids: Iterable[str], max_all_pairs: int = 32) -> Iterator[tuple[str, str]]:
    """Pairs ``(a, b)``, ``a < b``, to verify among documents sharing one LSH bucket.

    Small buckets give every pair; a bucket larger than ``max_all_pairs`` (boilerplate shared
    by many documents) gives only pairs with its smallest id, to stay linear in its size.
    """
    ids = sorted(set(ids))
    if len(ids) <= max_all_pairs:
        yield from itertools.combinations(ids, 2)
    else:
        first = ids[0]
        for other in ids[1:]:
            yield first, other


def components(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Connected components of an undirected graph: ``{node: smallest id in its component}``.

    Only nodes that appear in some edge are returned; every root maps to itself.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            # The smaller id becomes the root, so each root is its component's minimum.
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
    return {x: find(x) for x in parent}
