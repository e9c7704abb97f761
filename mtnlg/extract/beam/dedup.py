"""Deduplication marks: documents -> ``(id, "exact")`` and ``(id, "fuzzy")`` for each duplicate
to drop, moving only ids, 16-byte hashes and signatures between workers (the texts meet their
marks once, in ``write.DropMarked``).

1. exact: group by the hash of the normalised text; in each group the smallest id is kept;
2. fuzzy: the MinHash signature of each exact survivor is cut into LSH bands; documents
   sharing a band become candidate pairs; a pair is an edge when its estimated Jaccard
   similarity reaches the threshold; in each connected component of the edge graph
   (``grouping.ConnectedComponents``) the smallest id is kept.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindows

from mtnlg.extract.beam.common import COUNTS, DUPLICATES, LARGEST, NAMESPACE, UNCONVERGED, BundleMaximumFn, Doc
from mtnlg.extract.beam.grouping import ConnectedComponents
from mtnlg.extract.beam.write import DropMarked
from mtnlg.extract.config import DedupConfig
from mtnlg.extract.dedup import MinHasher, band_keys, candidate_pairs, jaccard_estimate, text_hash


class DedupKeyFn(beam.DoFn):
    """A document -> ``(exact hash, (id, MinHash signature bytes))``; the text stays behind."""

    def __init__(self, dedup: DedupConfig):
        self.dedup = dedup
        self.hasher: MinHasher | None = None

    def setup(self):
        d = self.dedup
        self.hasher = MinHasher(d.num_perm, d.ngram, d.seed) if d.fuzzy else None

    def process(self, doc: Doc):
        doc_id, _, text, *_ = doc   # a quality score, when the classifier ran, rides along
        sig = self.hasher.signature(text).astype("<u4").tobytes() if self.hasher else b""
        key = text_hash(text) if self.dedup.exact else doc_id.encode("utf-8")
        yield key, (doc_id, sig)


class KeepSmallestIdFn(beam.DoFn):
    """One exact-duplicate group -> its smallest id (main) and the others (``duplicates``)."""

    def __init__(self):
        self.dups = Metrics.counter(NAMESPACE, "duplicates_exact")

    def process(self, group):
        _, members = group
        members = sorted(members)
        yield members[0]
        for doc_id, _ in members[1:]:
            self.dups.inc()
            yield TaggedOutput(DUPLICATES, (doc_id, "exact"))


class BandKeysFn(beam.DoFn):
    """``(id, signature)`` -> ``(band key, id)`` for each LSH band."""

    def __init__(self, bands: int):
        self.bands = bands

    def process(self, item):
        doc_id, sig = item
        for key in band_keys(np.frombuffer(sig, dtype="<u4"), self.bands):
            yield key, doc_id


class CandidatePairsFn(BundleMaximumFn):
    """An LSH bucket -> pairs of ids to verify (all pairs, or a star for a huge bucket); on
    ``counts``, the comparisons a star leaves out and, per bundle, the largest bucket."""

    def __init__(self, max_all_pairs: int):
        super().__init__("fuzzy/largest_bucket")
        self.max_all_pairs = max_all_pairs

    def process(self, bucket):
        _, ids = bucket
        ids = list(ids)
        n = len(ids)
        if n > 1:
            self.note(n)
            yield from candidate_pairs(ids, self.max_all_pairs)
            if n > self.max_all_pairs:
                yield TaggedOutput(COUNTS, {"fuzzy/skipped_comparisons": n * (n - 1) // 2 - (n - 1)})


class AttachLeftSignatureFn(beam.DoFn):
    """Join step 1: ``a -> ({b...}, sig_a)`` becomes ``(b, (a, sig_a))`` for each distinct
    pair. A pair found in several bands arrives here once per band; it is made distinct
    here, in the join's grouping, rather than by a grouping of its own (a stage less)."""

    def process(self, joined):
        a, groups = joined
        sigs, partners = list(groups["sig"]), set(groups["pair"])
        if sigs and partners:
            for b in sorted(partners):
                yield b, (a, sigs[0])


class VerifyPairFn(beam.DoFn):
    """Join step 2: keeps pairs whose estimated Jaccard similarity reaches the threshold; on
    ``counts``, the pairs checked and found similar in each bundle."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.checked = Metrics.counter(NAMESPACE, "fuzzy_pairs_checked")
        self.similar = Metrics.counter(NAMESPACE, "fuzzy_pairs_similar")
        self.n_checked = self.n_similar = 0

    def start_bundle(self):
        self.n_checked = self.n_similar = 0

    def process(self, joined):
        b, groups = joined
        sigs = list(groups["sig"])
        if not sigs:
            return
        sig_b = np.frombuffer(sigs[0], dtype="<u4")
        for a, sig_a in groups["left"]:
            self.checked.inc()
            self.n_checked += 1
            if jaccard_estimate(np.frombuffer(sig_a, dtype="<u4"), sig_b) >= self.threshold:
                self.similar.inc()
                self.n_similar += 1
                yield a, b

    def finish_bundle(self):
        if self.n_checked:
            yield TaggedOutput(COUNTS, GlobalWindows.windowed_value(
                {"fuzzy/pairs_checked": self.n_checked, "fuzzy/pairs_similar": self.n_similar}))


class FuzzyMarksFn(beam.DoFn):
    """``(id, label)`` -> ``(id, "fuzzy")`` when the id is not its component's label (its
    smallest id). Counted here, before the marks' join, as the exact marks are."""

    def __init__(self):
        self.marks = Metrics.counter(NAMESPACE, "duplicates_fuzzy")

    def process(self, node_label: tuple[str, str]):
        if node_label[0] != node_label[1]:
            self.marks.inc()
            yield node_label[0], "fuzzy"


class ExactDedup(beam.PTransform):
    """``(hash, (id, sig))`` -> survivors ``(id, sig)`` and ``duplicates`` ``(id, "exact")``."""

    def expand(self, keyed):
        return (keyed
                | "GroupByTextHash" >> beam.GroupByKey()
                | "KeepSmallestId" >> beam.ParDo(KeepSmallestIdFn()).with_outputs(DUPLICATES, main="kept"))


class FuzzyDedup(beam.PTransform):
    """``(id, sig)`` of distinct texts -> ``marks``, ``(id, "fuzzy")`` for each near-duplicate
    to drop, and ``counts`` (pairs checked and similar, comparisons skipped, the largest
    bucket and group, nodes not converged after ``dedup.max_rounds`` rounds)."""

    def __init__(self, dedup: DedupConfig):
        super().__init__()
        self.dedup = dedup

    def expand(self, sigs):
        d = self.dedup
        candidates = (sigs
                      | "BandKeys" >> beam.ParDo(BandKeysFn(d.bands))
                      | "GroupByBand" >> beam.GroupByKey()
                      | "CandidatePairs" >> beam.ParDo(CandidatePairsFn(d.max_bucket_all_pairs)).with_outputs(
                          COUNTS, main="pairs"))
        left = ({"pair": candidates.pairs, "sig": sigs}
                | "JoinLeftSignature" >> beam.CoGroupByKey()
                | "AttachLeftSignature" >> beam.ParDo(AttachLeftSignatureFn()))
        verified = ({"left": left, "sig": sigs}
                    | "JoinRightSignature" >> beam.CoGroupByKey()
                    | "VerifyJaccard" >> beam.ParDo(VerifyPairFn(d.threshold)).with_outputs(COUNTS, main="edges"))
        cc = verified.edges | "ConnectedComponents" >> ConnectedComponents(d.max_rounds)
        marks = cc["labels"] | "NotSmallest" >> beam.ParDo(FuzzyMarksFn())
        counts = (candidates[COUNTS], verified[COUNTS], cc[LARGEST],
                  cc[UNCONVERGED] | "CountUnconverged" >> beam.Map(lambda _: {"fuzzy/unconverged_nodes": 1}))
        return {"marks": marks, "counts": counts | "FuzzyCounts" >> beam.Flatten()}


class Deduplicate(beam.PTransform):
    """Documents -> unique documents (``unique``), a ``duplicates`` output of kinds, and the
    fuzzy step's ``counts``."""

    def __init__(self, dedup: DedupConfig):
        super().__init__()
        self.dedup = dedup

    def expand(self, docs):
        d = self.dedup
        if not (d.exact or d.fuzzy):
            return {"unique": docs, DUPLICATES: docs.pipeline | "NoDuplicates" >> beam.Create([]),
                    COUNTS: docs.pipeline | "NoDedupCounts" >> beam.Create([])}
        keys = docs | "DedupKeys" >> beam.ParDo(DedupKeyFn(d))
        marks = []
        if d.exact:
            exact = keys | "Exact" >> ExactDedup()
            survivors = exact.kept
            marks.append(exact[DUPLICATES])
        else:
            survivors = keys | "Values" >> beam.Values()
        if d.fuzzy:
            fuzzy = survivors | "Fuzzy" >> FuzzyDedup(d)
            marks.append(fuzzy["marks"])
            counts = fuzzy["counts"]
        else:
            counts = docs.pipeline | "NoFuzzyCounts" >> beam.Create([])
        dup_marks = tuple(marks) | "AllDuplicateMarks" >> beam.Flatten()
        result = {"docs": docs, "marks": dup_marks} | "DropMarked" >> DropMarked()
        return {"unique": result.unique, DUPLICATES: result[DUPLICATES], COUNTS: counts}
