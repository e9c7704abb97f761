"""Downstream-task decontamination: evaluation text cut out of the training documents.

The procedure of Megatron-LM's ``tools/openwebtext/filter_ngrams.py``, which MT-NLG used
(after GPT-3, appendix C), with the defaults of ``DecontaminateConfig``:

* **Words.** A word is a maximal run of ``\\w`` characters (Unicode letters, digits and
  the underscore), lowercased with ``str.lower``; everything else (punctuation, spaces,
  symbols) only separates words. ``"Don't stop!"`` is ``don t stop``.
* **Evaluation n-grams.** Every run of ``ngram`` (13) consecutive words of an evaluation
  text; a text of ``min_ngram`` (8) to 12 words is one shorter n-gram of all its words; a
  shorter text gives none. Each n-gram is kept as a 64-bit hash of its words (a
  polynomial in their 64-bit BLAKE2b hashes).
* **Matching.** The training document's word n-grams of every length the evaluation
  n-grams have are looked up; the match that starts at the leftmost word is taken (of
  several lengths there, the longest).
* **Cutting.** The match's characters (from its first word's first character to its last
  word's last) and ``margin_chars`` (200) characters on each side are removed. With
  ``sentence_boundaries`` the cut widens outward to a sentence end: the piece before ends
  with the last ``.``, ``!`` or ``?`` left of the removed margin, the piece after starts
  just after the first one at or after the margin's end (no such mark: the piece is
  empty). The piece before is final (no n-gram of the text starts in it); the piece after
  is scanned again, and so on until no match is left.
* **Pieces.** Each piece is stripped of whitespace at both ends; a piece shorter than
  ``min_piece_chars`` (200) characters is dropped; a document left in more than
  ``max_pieces`` (10) pieces is dropped whole. A document without a match is left
  exactly as it was; the pieces of one with matches are written as documents with the
  ids ``<id>#0``, ``<id>#1``, ... in text order.

Where this differs from Megatron's code, on purpose: its cut measures the n-gram as its
words joined by single spaces, not its span in the text, and its index arithmetic removes
at least 199 characters before and 201 after; it keeps a piece only when longer than 200
characters (here: 200 or more); it lowercases the whole text before finding words (here
each word, so that positions stay those of the text); it leaves pieces unstripped; it
checks nothing in a training text of fewer than 13 words, and in one of exactly 13 only
the n-grams starting at its first word. Its ``--key-threshold`` (evaluation n-grams found
in 10 or more training documents are common text and not cut) is ``frequent_documents``
here, off by default (every evaluation n-gram is cut); when set, a document counts once
per distinct n-gram it holds anywhere (Megatron's count skips n-grams overlapping an
earlier match).

Everything here is plain Python and numpy, used by the Beam pipeline
(``decontaminate_beam``) and the reference loop alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from hashlib import blake2b as _blake2b
from typing import Iterable

import numpy as np

from mtnlg.extract import stats as st
from mtnlg.extract.clean import clean_text
from mtnlg.extract.config import DecontaminateConfig
from mtnlg.extract.readers import Failure, expand_setting, read_file
from mtnlg.extract.split import TRAIN

WORD = re.compile(r"\w+")
SENTENCE_ENDS = frozenset(".!?")
PIECE_SEPARATOR = "#"  # piece ids: <document id>#<piece index>

# Words recur across documents: their hashes are kept, per process, up to a bound (then
# the cache starts afresh).
_WORD_HASHES: dict[str, int] = {}
_WORD_HASHES_MAX = 1 << 18  # about 30 MB
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) combining word hashes
_EMPTY = np.zeros(0, dtype=np.uint64)


def lower_words(words: list[str]) -> list[str]:
    """Each word lowercased (one ``str.lower`` call for all: no word holds a newline)."""
    return "\n".join(words).lower().split("\n") if words else []


def word_hashes(words: list[str]) -> np.ndarray:
    """(W,) uint64: a hash of each (lowercased) word, the same in every process: 64-bit
    BLAKE2b of its UTF-8 (Python's own ``hash`` is salted per process; two CRC-32s would
    hold only 32 bits of the word)."""
    cache = _WORD_HASHES
    if len(cache) > _WORD_HASHES_MAX:
        cache.clear()
    cache.update({w: _word_hash(w) for w in set(words).difference(cache)})
    try:
        return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))
    except KeyError:  # another thread of this worker cleared the cache meanwhile
        return np.fromiter(map(_word_hash, words), dtype=np.uint64, count=len(words))


def _word_hash(word: str) -> int:
    return int.from_bytes(_blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def ngram_hashes(wh: np.ndarray, k: int) -> np.ndarray:
    """(W-k+1,) uint64: the hash of each run of ``k`` words (a polynomial in the word
    hashes, wrapping uint64 arithmetic); empty when there are fewer than ``k`` words."""
    n = len(wh) - k + 1
    if n <= 0:
        return _EMPTY
    h = wh[:n].copy()
    for t in range(1, k):
        h *= _MIX
        h += wh[t:t + n]
    return h


def evaluation_ngrams(text: str, ngram: int, min_ngram: int) -> dict[int, np.ndarray]:
    """``{length: hashes}`` of an evaluation text: its ``ngram``-grams, or, for a text of
    ``min_ngram`` to ``ngram - 1`` words, one n-gram of all its words; ``{}`` for fewer."""
    words = lower_words(WORD.findall(text))
    if len(words) >= ngram:
        return {ngram: np.unique(ngram_hashes(word_hashes(words), ngram))}
    if len(words) >= min_ngram:
        return {len(words): ngram_hashes(word_hashes(words), len(words))}
    return {}


class NgramSet:
    """Evaluation n-gram hashes by length, each a sorted array: what training text is checked
    against. At 8 bytes an n-gram it is small enough to send every worker whole (a Beam side
    input) while the evaluation text is up to a few GB; see ``decontaminate_beam`` for larger."""

    def __init__(self, by_length: dict[int, np.ndarray] | None = None):
        self.by_length = {k: np.unique(v.astype(np.uint64)) for k, v in sorted((by_length or {}).items())
                          if len(v)}
        self.lengths = tuple(sorted(self.by_length))  # ascending

    @classmethod
    def union(cls, parts: Iterable[dict[int, np.ndarray]]) -> "NgramSet":
        merged: dict[int, list[np.ndarray]] = {}
        for part in parts:
            for k, v in part.items():
                merged.setdefault(k, []).append(v)
        return cls({k: np.concatenate(v) for k, v in merged.items()})

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_length.values())

    def __bool__(self) -> bool:
        return bool(self.by_length)

    def without(self, other: "NgramSet") -> "NgramSet":
        """The n-grams of this set that are not in ``other``."""
        return NgramSet({k: np.setdiff1d(v, other.by_length.get(k, _EMPTY), assume_unique=True)
                         for k, v in self.by_length.items()})

    def contains(self, k: int, hashes: np.ndarray) -> np.ndarray:
        """(N,) bool: which ``hashes`` are evaluation n-grams of length ``k``."""
        table = self.by_length.get(k)
        if table is None or not len(hashes):
            return np.zeros(len(hashes), dtype=bool)
        i = np.searchsorted(table, hashes)
        return table[np.minimum(i, len(table) - 1)] == hashes

    def match_lengths(self, wh: np.ndarray) -> np.ndarray:
        """(W,) int: for each word, the length of the longest evaluation n-gram starting
        there (0: none)."""
        best = np.zeros(len(wh), dtype=np.int64)
        for k in self.lengths:  # ascending: a longer match overwrites a shorter one
            hit = self.contains(k, ngram_hashes(wh, k))
            best[:len(hit)][hit] = k
        return best


def ngram_hits(text: str, ngrams: NgramSet) -> dict[int, np.ndarray]:
    """``{length: hashes}`` of the distinct evaluation n-grams ``text`` holds, anywhere in
    it: what ``frequent_documents`` counts documents by."""
    if not ngrams:
        return {}
    wh = word_hashes(lower_words(WORD.findall(text)))
    hits = {}
    for k in ngrams.lengths:
        h = ngram_hashes(wh, k)
        found = np.unique(h[ngrams.contains(k, h)])
        if len(found):
            hits[k] = found
    return hits


def frequent_ngrams(document_counts: Iterable[tuple[tuple[int, int], int]], min_documents: int) -> NgramSet:
    """The n-grams ``((length, hash), documents)`` found in at least ``min_documents``."""
    frequent: dict[int, list[int]] = {}
    for (k, h), n in document_counts:
        if n >= min_documents:
            frequent.setdefault(k, []).append(h)
    return NgramSet({k: np.array(v, dtype=np.uint64) for k, v in frequent.items()})


@dataclass(frozen=True)
class Decontaminated:
    """What decontamination made of one text: ``pieces`` (the text itself when ``matches``
    is 0), and whether it was ``dropped_whole`` (more than ``max_pieces`` pieces; then
    ``pieces`` is empty)."""

    pieces: list[str]
    matches: int
    dropped_whole: bool = False


def decontaminate_text(text: str, ngrams: NgramSet, cfg: DecontaminateConfig) -> Decontaminated:
    """``text`` with every evaluation n-gram and its margins cut out (the module's rules)."""
    if not ngrams:
        return Decontaminated([text], 0)
    found = WORD.findall(text)
    wh = word_hashes(lower_words(found))
    best = ngrams.match_lengths(wh)
    if not best.any():  # the common case: one pass over the words, nothing to cut
        return Decontaminated([text], 0)
    spans = [m.span() for m in WORD.finditer(text)]
    starts = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
    hits = np.flatnonzero(best)
    pieces: list[str] = []
    matches, b = 0, 0  # the text still to scan is text[b:]
    while True:
        m = _first_match(text, b, starts, spans, wh, best, hits, ngrams)
        if m is None:
            pieces.append(text[b:])
            break
        matches += 1
        first_end, second_start = _cut(text, b, m[0], m[1], cfg)
        pieces.append(text[b:first_end])
        if len(text) - second_start < cfg.min_piece_chars:  # nothing left worth scanning
            break
        b = second_start
    kept = [p for p in (p.strip() for p in pieces) if len(p) >= cfg.min_piece_chars]
    if len(kept) > cfg.max_pieces:
        return Decontaminated([], matches, dropped_whole=True)
    return Decontaminated(kept, matches)


def _first_match(text: str, b: int, starts: np.ndarray, spans: list[tuple[int, int]], wh: np.ndarray,
                 best: np.ndarray, hits: np.ndarray, ngrams: NgramSet) -> tuple[int, int] | None:
    """``(start, end)`` characters of the leftmost (then longest) match in ``text[b:]``, or None.

    The words of ``text[b:]`` are the text's words that start at ``b`` or later, and, when
    ``b`` falls inside a word (a cut without sentence boundaries), that word's tail first."""
    j0 = int(np.searchsorted(starts, b))
    if j0 > 0 and spans[j0 - 1][1] > b:  # b cuts word j0-1: its tail is a word of its own
        tail_end = spans[j0 - 1][1]
        head = word_hashes(lower_words([text[b:tail_end]]))
        for k in reversed(ngrams.lengths):
            if j0 - 1 + k <= len(wh):
                h = ngram_hashes(np.concatenate([head, wh[j0:j0 - 1 + k]]), k)
                if ngrams.contains(k, h)[0]:
                    return b, spans[j0 - 2 + k][1]
    i = int(np.searchsorted(hits, j0))
    if i == len(hits):
        return None
    j = int(hits[i])
    return spans[j][0], spans[j + int(best[j]) - 1][1]


def _cut(text: str, b: int, start: int, end: int, cfg: DecontaminateConfig) -> tuple[int, int]:
    """``(end of the piece before, start of the piece after)`` a match at ``[start, end)`` of
    ``text[b:]``: ``margin_chars`` removed on each side, widened to sentence ends."""
    left, right = start - cfg.margin_chars, end + cfg.margin_chars
    if not cfg.sentence_boundaries:
        return max(left, b), min(right, len(text))
    p = left - 1  # the piece before ends with the last sentence end before the margin
    while p >= b and text[p] not in SENTENCE_ENDS:
        p -= 1
    q = right - 1  # the piece after starts after the first one at or after the margin's end
    while q < len(text) and text[q] not in SENTENCE_ENDS:
        q += 1
    return max(p + 1, b), min(q + 1, len(text))


def decontaminate_document(doc_id: str, text: str, ngrams: NgramSet,
                           cfg: DecontaminateConfig) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """``([(id, text)] to write to the train split, counters)`` for one training document:
    the document itself when it holds no evaluation n-gram, otherwise its pieces
    (``<id>#<k>``). The counters are the document's outcome for ``stats.json``: kept (whole
    or in pieces; each piece is one record of the split) or, with the ``decontaminated/*``
    counts, dropped whole or left without a piece. The pipeline and the reference loop both
    call this, so both count the same."""
    result = decontaminate_text(text, ngrams, cfg)
    if not result.matches:
        return [(doc_id, text)], st.kept(TRAIN, len(text.encode("utf-8")))
    records = [(f"{doc_id}{PIECE_SEPARATOR}{k}", piece) for k, piece in enumerate(result.pieces)]
    kept_bytes = sum(len(p.encode("utf-8")) for p in result.pieces)
    counters = {"decontaminated/documents": 1, "decontaminated/matches": result.matches,
                "decontaminated/pieces": len(records),
                "decontaminated/dropped_whole": int(result.dropped_whole),
                "decontaminated/emptied": int(not records and not result.dropped_whole),
                "decontaminated/bytes_removed": len(text.encode("utf-8")) - kept_bytes}
    if records:
        st.add(counters, {**st.kept(TRAIN, kept_bytes), f"splits/{TRAIN}/docs": len(records)})
    return records, counters


def expand_task_files(cfg: DecontaminateConfig) -> list[str]:
    """The task files to read: ``task_files`` expanded as the step's inputs are (folders,
    globs, gs://, s3://; in a folder only known formats). One that matches nothing raises
    ``FileNotFoundError`` naming it."""
    return expand_setting(cfg.task_files, "decontaminate.task_files") if cfg.task_files else []


def task_texts(path: str, cfg: DecontaminateConfig, max_doc_bytes: int,
               max_binary_fraction: float) -> Iterable[str]:
    """The cleaned texts of one task file (read as the step reads its inputs). A record that
    cannot be read is an error naming it: evaluation text left out would be trained on."""
    for rec in read_file(path, cfg.text_field, max_doc_bytes, max_binary_fraction):
        if isinstance(rec, Failure):
            raise ValueError(f"decontaminate.task_files: {rec.source}: {rec.reason}"
                             + (f" ({rec.detail})" if rec.detail else ""))
        yield clean_text(rec.text)
