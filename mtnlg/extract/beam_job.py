"""The extract step as an Apache Beam pipeline: read -> clean -> filter -> dedup -> split -> write.

    files --Read--> documents --CleanAndFilter--> clean documents --Deduplicate--> unique
          \\-> failed            \\-> dropped                       \\-> duplicates
    unique --Split--> train / validation --WriteJsonl (by id hash, sorted)--> DIR/{train,validation}/part-*.jsonl
                      train --Decontaminate (validation's and task files' n-grams)--> train records
    every outcome --Stats--> DIR/stats.json

Elements are whole documents (one text file, JSONL line or HTML page), never lines: Beam's
per-element cost would dominate otherwise. Each step counts what it does with
``Metrics.counter``; the exact numbers in ``stats.json`` come from the data itself (every
document ends in exactly one outcome, summed by a combiner), so they do not depend on a
runner reporting metrics.

Deduplication moves only ids, hashes and signatures between workers; the texts are joined
back by id once, at the end:

1. exact: group by the hash of the normalised text; in each group the smallest id is kept;
2. fuzzy: the MinHash signature of each exact survivor is cut into LSH bands; documents
   sharing a band become candidate pairs; a pair is an edge when its estimated Jaccard
   similarity reaches the threshold; in each connected component of the edge graph the
   smallest id is kept. The components are found inside Beam by rounds of the large-star
   and small-star operations (``dedup.components=distributed``,
   :class:`ConnectedComponents`), where no step gathers the edges or the documents, or on
   one worker from the gathered edges (``single``); the default ``auto`` is ``single`` on
   the DirectRunner and ``distributed`` on every other runner.

Run it with ``mtnlg extract`` or ``run(argv)``; the library entry is :func:`extract`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections import Counter
from typing import Any


class _WithoutApitoolsNotice(logging.Filter):
    """Importing Beam without its gcp extra logs "apitools not found, and bigquery client
    libraries are not available" on the root logger; the step uses no BigQuery, and its
    gs:// reads go through google-cloud-storage."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_WithoutApitoolsNotice())  # before Beam is imported

import apache_beam as beam  # noqa: E402
import numpy as np  # noqa: E402
from apache_beam.metrics import Metrics  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.pvalue import AsList, TaggedOutput  # noqa: E402
from apache_beam.transforms.window import GlobalWindows  # noqa: E402

from mtnlg import storage
from mtnlg.config import ConfigError, load_config
from mtnlg.extract import stats as st
from mtnlg.extract.clean import clean_text
from mtnlg.extract.config import DedupConfig, ExtractConfig, FilterConfig
from mtnlg.extract.decontaminate import expand_task_files
from mtnlg.extract.decontaminate_beam import Decontaminate
from mtnlg.extract.dedup import MinHasher, band_keys, candidate_pairs, components, jaccard_estimate, text_hash
from mtnlg.extract.filters import first_failing_rule
from mtnlg.extract.readers import Failure, expand_inputs, read_file, relative_names
from mtnlg.extract.split import SPLITS, TRAIN, VALIDATION, split_of
from mtnlg.formats.rundir import STATS_FILE
from mtnlg.progress import Progress, get_logger

NAMESPACE = st.METRICS_NAMESPACE
FAILED, DROPPED, DUPLICATES, FILES = "failed", "dropped", "duplicates", "files"
COUNTS, UNCONVERGED, LARGEST = "counts", "unconverged", "largest"

log = get_logger("mtnlg.extract")

# A document between steps: (id, source, text). Plain tuples of str travel through Beam's
# fast coder without pickling.
Doc = tuple[str, str, str]


# --- DoFns: one element in, outcomes out --------------------------------------------------

class ReadDocumentsFn(beam.DoFn):
    """A file path -> its documents; failures go to the ``failed`` output with their reason.

    Also emits one counter dict per file on the ``files`` output (records read, bytes,
    invalid UTF-8 replacements), from which ``stats.json`` takes ``read`` and ``bytes_in``.
    """

    def __init__(self, text_field: str, max_doc_bytes: int, max_binary_fraction: float):
        self.text_field, self.max_doc_bytes, self.max_binary_fraction = text_field, max_doc_bytes, max_binary_fraction
        self.files = Metrics.counter(NAMESPACE, "files_read")
        self.docs = Metrics.counter(NAMESPACE, "docs_read")
        self.bytes = Metrics.counter(NAMESPACE, "bytes_in")
        self.progress: Progress | None = None

    def setup(self):
        self.progress = Progress("extract: read (this worker)", unit="files", every_s=15.0,
                                 logger=get_logger("mtnlg.extract"))

    def process(self, file: tuple[str, str]):
        path, name = file  # name: relative to its input, for location-independent ids
        records = nbytes = replaced = 0
        for rec in read_file(path, self.text_field, self.max_doc_bytes, self.max_binary_fraction, name):
            records += 1
            nbytes += rec.nbytes
            if isinstance(rec, Failure):
                Metrics.counter(NAMESPACE, f"failed_{rec.reason}").inc()
                log.debug("failed (%s): %s %s", rec.reason, rec.source, rec.detail)
                yield TaggedOutput(FAILED, (rec.reason, rec.source, rec.detail))
            else:
                replaced += rec.replaced
                self.docs.inc()
                yield rec.id, rec.source, rec.text
        self.files.inc()
        self.bytes.inc(nbytes)
        if self.progress:
            self.progress.update(1)
        yield TaggedOutput(FILES, st.file_read(records, nbytes, replaced))


class CleanAndFilterFn(beam.DoFn):
    """Cleans a document's text, then drops it (``dropped`` output, rule name) or passes it on."""

    def __init__(self, filters: FilterConfig):
        self.filters = filters
        self.kept = Metrics.counter(NAMESPACE, "docs_passed_filters")

    def process(self, doc: Doc):
        doc_id, source, text = doc
        text = clean_text(text)
        rule = first_failing_rule(text, self.filters)
        if rule:
            Metrics.counter(NAMESPACE, f"dropped_{rule}").inc()
            yield TaggedOutput(DROPPED, rule)
        else:
            self.kept.inc()
            yield doc_id, source, text


class DedupKeyFn(beam.DoFn):
    """A document -> ``(exact hash, (id, MinHash signature bytes))``; the text stays behind."""

    def __init__(self, dedup: DedupConfig):
        self.dedup = dedup
        self.hasher: MinHasher | None = None

    def setup(self):
        d = self.dedup
        self.hasher = MinHasher(d.num_perm, d.ngram, d.seed) if d.fuzzy else None

    def process(self, doc: Doc):
        doc_id, _, text = doc
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


class _BundleMaximumFn(beam.DoFn):
    """A DoFn that notes (``self.note(n)``) the largest of something in each bundle and, at
    the bundle's end, emits it as ``{counter: n}`` on output ``tag`` (``stats.MAX_KEYS``
    combine such counters by maximum)."""

    def __init__(self, counter: str, tag: str = COUNTS):
        self.counter, self.tag, self.largest = counter, tag, 0

    def start_bundle(self):
        self.largest = 0

    def note(self, n: int) -> None:
        self.largest = max(self.largest, n)

    def finish_bundle(self):
        if self.largest:
            yield TaggedOutput(self.tag, GlobalWindows.windowed_value({self.counter: self.largest}))


class CandidatePairsFn(_BundleMaximumFn):
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
    """Join step 1: ``a -> ({b...}, sig_a)`` becomes ``(b, (a, sig_a))`` for each pair."""

    def process(self, joined):
        a, groups = joined
        sigs, partners = list(groups["sig"]), list(groups["pair"])
        if sigs and partners:
            for b in partners:
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


class GatheredComponentsFn(beam.DoFn):
    """All edges (gathered on one worker) -> ``(id, "fuzzy")`` for every node that is not its
    component's smallest id, and on ``counts`` the largest group (``dedup.components=single``,
    or ``auto`` on the DirectRunner)."""

    def __init__(self):
        self.marks = Metrics.counter(NAMESPACE, "duplicates_fuzzy")

    def process(self, edges: list[tuple[str, str]]):
        roots = components(edges)
        for node, root in sorted(roots.items()):
            if node != root:
                self.marks.inc()
                yield node, "fuzzy"
        if roots:
            yield TaggedOutput(COUNTS, {"fuzzy/largest_group": max(Counter(roots.values()).values())})


def _both_ways(edge: tuple[str, str]):
    a, b = edge
    yield a, b
    yield b, a


def _larger_first(edge: tuple[str, str]) -> list[tuple[str, str]]:
    a, b = edge
    return [] if a == b else [(a, b) if a > b else (b, a)]


class LargeStarFn(beam.DoFn):
    """``u -> neighbours of u`` -> every neighbour larger than u, linked to the smallest of
    u and its neighbours (large-star)."""

    def process(self, grouped):
        u, neighbours = grouped
        neighbours = set(neighbours)
        m = min(neighbours | {u})
        for v in neighbours:
            if v > u:
                yield v, m


class SmallStarFn(beam.DoFn):
    """``u -> neighbours of u smaller than u`` -> u and each of them, linked to the smallest
    (small-star)."""

    def process(self, grouped):
        u, smaller = grouped
        smaller = set(smaller)
        m = min(smaller)
        yield u, m
        for v in smaller:
            if v != m:
                yield v, m


class StarLabelFn(_BundleMaximumFn):
    """``u -> neighbours of u`` after the last round -> ``(u, its smallest neighbour, or u)``;
    a 1 on ``unconverged`` when u is not yet a root (only larger neighbours) or a leaf (one
    neighbour, smaller); per bundle, on ``largest``, ``{"fuzzy/largest_group": n}`` with the
    most members a root gathers (the largest group, once converged)."""

    def __init__(self):
        super().__init__("fuzzy/largest_group", LARGEST)

    def process(self, grouped):
        u, neighbours = grouped
        neighbours = set(neighbours)
        m = min(neighbours | {u})
        yield u, m
        if m == u:
            self.note(len(neighbours) + 1)
        elif len(neighbours) > 1:
            yield TaggedOutput(UNCONVERGED, 1)


class ConnectedComponents(beam.PTransform):
    """Undirected edges -> ``(node, smallest id in its component)`` for every node on an edge,
    by ``rounds`` rounds of the large-star and small-star operations (Kiveris et al., 2014):
    each is one grouping of the edges by a node, so no step holds more than one node's
    neighbours, and the edges never outnumber the input's. Both keep every component
    connected and the edges only ever point from a node to a smaller one of the same
    component; they stop changing exactly when each component is a star around its
    smallest id. A shuffled chain of 10,000 nodes gets there in 11 rounds, a sorted one in
    14; near-duplicate groups in 2 or 3. A node that has not converged is labelled with a
    smaller node of its component, never a smaller id than the component's: it can only be
    kept when it should have been dropped, never the reverse. Also returns, on
    ``unconverged``, a 1 for each node that is not yet a star's root or leaf after the last
    round (none: every component is exact), and on ``largest`` the size of the largest group
    as ``{"fuzzy/largest_group": n}`` (one per bundle: take the maximum)."""

    def __init__(self, rounds: int):
        super().__init__()
        self.rounds = rounds

    def expand(self, edges):
        edges = edges | "LargerFirst" >> beam.FlatMap(_larger_first)
        for r in range(1, self.rounds + 1):
            edges = (edges
                     | f"BothWays{r}" >> beam.FlatMap(_both_ways)
                     | f"Neighbours{r}" >> beam.GroupByKey()
                     | f"LargeStar{r}" >> beam.ParDo(LargeStarFn())
                     | f"SmallerNeighbours{r}" >> beam.GroupByKey()
                     | f"SmallStar{r}" >> beam.ParDo(SmallStarFn()))
        labels = (edges
                  | "BothWaysLast" >> beam.FlatMap(_both_ways)
                  | "NeighboursLast" >> beam.GroupByKey()
                  | "Label" >> beam.ParDo(StarLabelFn()).with_outputs(UNCONVERGED, LARGEST, main="labels"))
        return {"labels": labels.labels, "unconverged": labels[UNCONVERGED], "largest": labels[LARGEST]}


class FuzzyMarksFn(beam.DoFn):
    """``(id, label)`` -> ``(id, "fuzzy")`` when the id is not its component's label (its
    smallest id). Counted here, before the marks' join, as the exact marks are."""

    def __init__(self):
        self.marks = Metrics.counter(NAMESPACE, "duplicates_fuzzy")

    def process(self, node_label: tuple[str, str]):
        if node_label[0] != node_label[1]:
            self.marks.inc()
            yield node_label[0], "fuzzy"


class DropDuplicatesFn(beam.DoFn):
    """``id -> (documents, duplicate marks)`` -> the document, or its duplicate outcome.

    Both kinds of mark are counted where they are made (``duplicates_exact``,
    ``duplicates_fuzzy``), so a mark lost on its way to this join shows as a disagreement
    between those counters and ``stats.json``. The marks that reach this join are counted
    too (``marks_joined``), and those whose document is not there
    (``marks_without_document``, always 0 unless a runner splits a key), so a difference
    says on which side of the join it arose."""

    def __init__(self):
        self.joined = Metrics.counter(NAMESPACE, "marks_joined")
        self.orphans = Metrics.counter(NAMESPACE, "marks_without_document")

    def process(self, joined):
        doc_id, groups = joined
        marks = list(groups["dup"])
        docs = list(groups["doc"])
        if marks:
            self.joined.inc(len(marks))
            if not docs:
                self.orphans.inc(len(marks))
        for source, text in docs:
            if marks:
                yield TaggedOutput(DUPLICATES, marks[0])
            else:
                yield doc_id, source, text


class SplitFn(beam.DoFn):
    """Routes a document to ``train`` (main) or ``validation`` by its id hash; counts the
    splits in ``counted`` as kept (decontamination counts the train records it writes)."""

    def __init__(self, validation_fraction: float, seed: int, counted: tuple[str, ...] = SPLITS):
        self.fraction, self.seed, self.counted = validation_fraction, seed, counted

    def process(self, doc: Doc):
        split = split_of(doc[0], self.fraction, self.seed)
        if split in self.counted:
            Metrics.counter(NAMESPACE, f"kept_{split}").inc()
        yield doc if split == TRAIN else TaggedOutput(VALIDATION, doc)


class SumCountersFn(beam.CombineFn):
    """Sums flat counter dicts (``{"failed/binary": 1}``); the empty sum is ``{}``."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, item):
        return st.add(acc, item)

    def merge_accumulators(self, accs):
        return st.sum_counters(accs)

    def extract_output(self, acc):
        return acc


class WriteStatsFn(beam.DoFn):
    """Summed counters -> ``stats.json`` (atomically), once the shards are written."""

    def __init__(self, path: str, inputs: list[str], files: int, skipped: list[str]):
        self.path, self.inputs, self.files, self.skipped = path, inputs, files, skipped

    def process(self, counters, examples, train_files, validation_files):
        stats = st.build_stats(counters, inputs=self.inputs, files=self.files, skipped=self.skipped,
                               examples=dict(examples),
                               written={TRAIN: train_files, VALIDATION: validation_files})
        with storage.atomic_write(self.path, "w") as f:
            f.write(json.dumps(stats, indent=2) + "\n")
        yield stats


def to_json_line(doc: Doc) -> str:
    doc_id, source, text = doc
    return json.dumps({"id": doc_id, "text": text, "source": source}, ensure_ascii=False)


# --- PTransforms: labelled steps composed ----------------------------------------------------

class ReadDocuments(beam.PTransform):
    """``(path, relative name)`` pairs -> documents, with ``failed`` and per-file ``files``
    counters on the side (``relative_names`` gives the names)."""

    def __init__(self, cfg: ExtractConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, paths):
        return paths | "ReadFile" >> beam.ParDo(
            ReadDocumentsFn(self.cfg.text_field, self.cfg.max_doc_bytes, self.cfg.max_binary_fraction)
        ).with_outputs(FAILED, FILES, main="docs")


class ExactDedup(beam.PTransform):
    """``(hash, (id, sig))`` -> survivors ``(id, sig)`` and ``duplicates`` ``(id, "exact")``."""

    def expand(self, keyed):
        return (keyed
                | "GroupByTextHash" >> beam.GroupByKey()
                | "KeepSmallestId" >> beam.ParDo(KeepSmallestIdFn()).with_outputs(DUPLICATES, main="kept"))


class FuzzyDedup(beam.PTransform):
    """``(id, sig)`` of distinct texts -> ``(id, "fuzzy")`` for each near-duplicate to drop."""

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
        pairs = candidates.pairs | "DistinctPairs" >> beam.Distinct()
        left = ({"pair": pairs, "sig": sigs}
                | "JoinLeftSignature" >> beam.CoGroupByKey()
                | "AttachLeftSignature" >> beam.ParDo(AttachLeftSignatureFn()))
        verified = ({"left": left, "sig": sigs}
                    | "JoinRightSignature" >> beam.CoGroupByKey()
                    | "VerifyJaccard" >> beam.ParDo(VerifyPairFn(d.threshold)).with_outputs(COUNTS, main="edges"))
        counts = [candidates[COUNTS], verified[COUNTS]]
        if resolve_components(d.components, sigs.pipeline) == "single":
            gathered = (verified.edges
                        | "CollectEdges" >> beam.combiners.ToList()
                        | "ConnectedComponents" >> beam.ParDo(GatheredComponentsFn()).with_outputs(
                            COUNTS, main="marks"))
            marks = gathered.marks
            counts.append(gathered[COUNTS])
        else:
            cc = verified.edges | "ConnectedComponents" >> ConnectedComponents(d.max_rounds)
            marks = cc["labels"] | "NotSmallest" >> beam.ParDo(FuzzyMarksFn())
            counts += [cc["unconverged"] | "CountUnconverged" >> beam.Map(lambda _: {"fuzzy/unconverged_nodes": 1}),
                       cc["largest"]]
        return {"marks": marks, "counts": tuple(counts) | "FuzzyCounts" >> beam.Flatten()}


def resolve_components(components: str, pipeline: beam.Pipeline) -> str:
    """``dedup.components`` for this pipeline: ``auto`` is ``single`` on the DirectRunner
    (one machine: union-find over the gathered edges costs nothing a local run does not
    already hold) and ``distributed`` on every other runner (Dataflow, Flink, Spark, the
    portable runner), where no step may gather the edges."""
    if components != "auto":
        return components
    from apache_beam.options.pipeline_options import StandardOptions

    runner = pipeline.options.view_as(StandardOptions).runner if pipeline.options else None
    return "single" if (runner or "DirectRunner").lower() in DIRECT_RUNNERS else "distributed"


class Deduplicate(beam.PTransform):
    """Documents -> unique documents (main) and a ``duplicates`` output of kinds."""

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
        by_id = docs | "KeyById" >> beam.Map(lambda doc: (doc[0], (doc[1], doc[2])))
        result = ({"doc": by_id, "dup": dup_marks}
                  | "JoinMarks" >> beam.CoGroupByKey()
                  | "DropDuplicates" >> beam.ParDo(DropDuplicatesFn()).with_outputs(DUPLICATES, main="unique"))
        return {"unique": result.unique, DUPLICATES: result[DUPLICATES], COUNTS: counts}


class WriteShardFn(beam.DoFn):
    """One shard's documents, sorted by id -> ``DIR/part-NNNNN-of-MMMMM.jsonl`` (atomically)."""

    def __init__(self, directory: str, num_shards: int):
        self.directory, self.num_shards = directory, num_shards

    def process(self, shard_docs):
        shard, docs = shard_docs
        lines = sorted(to_json_line(d) for d in docs if d is not None)  # JSON starts with the id
        path = storage.join(self.directory, f"part-{shard:05d}-of-{self.num_shards:05d}.jsonl")
        with storage.atomic_write(path, "w") as f:
            for line in lines:
                f.write(line + "\n")
        yield path


def shard_of(doc_id: str, num_shards: int) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") % num_shards


class WriteJsonl(beam.PTransform):
    """Documents -> ``DIR/part-NNNNN-of-MMMMM.jsonl``; outputs the file names written.

    A document's shard is a hash of its id and each shard is sorted by id, so the files are
    byte-identical whatever the runner, worker count or bundle order (and so is everything
    tokenize and train make from them). Every shard is written, empty ones too.
    """

    def __init__(self, directory: str, num_shards: int):
        super().__init__()
        self.directory, self.num_shards = directory, num_shards

    def expand(self, docs):
        n = self.num_shards
        keyed = docs | "KeyByShard" >> beam.Map(lambda d: (shard_of(d[0], n), d))
        every = docs.pipeline | "AllShards" >> beam.Create([(k, None) for k in range(n)])
        return ((keyed, every)
                | "WithEmptyShards" >> beam.Flatten()
                | "GroupShards" >> beam.GroupByKey()
                | "WriteShards" >> beam.ParDo(WriteShardFn(self.directory, n)))


class ExtractDocuments(beam.PTransform):
    """The whole step on a PCollection of file paths; outputs the stats dict (one element)."""

    def __init__(self, cfg: ExtractConfig, output: str, inputs: list[str], files: int, skipped: list[str]):
        super().__init__()
        self.cfg, self.output, self.inputs, self.files, self.skipped = cfg, output, inputs, files, skipped

    def expand(self, paths):
        cfg = self.cfg
        read = paths | "Read" >> ReadDocuments(cfg)
        cleaned = read.docs | "CleanAndFilter" >> beam.ParDo(CleanAndFilterFn(cfg.filters)).with_outputs(
            DROPPED, main="docs")
        dedup = cleaned.docs | "Deduplicate" >> Deduplicate(cfg.dedup)
        decontaminate = cfg.decontaminate.enabled
        split = dedup["unique"] | "Split" >> beam.ParDo(SplitFn(
            cfg.validation_fraction, cfg.seed, (VALIDATION,) if decontaminate else SPLITS)).with_outputs(
            VALIDATION, main=TRAIN)
        if decontaminate:
            cut = {TRAIN: split[TRAIN], VALIDATION: split[VALIDATION]} | "Decontaminate" >> Decontaminate(cfg)
            train, train_counts = cut[TRAIN], cut[COUNTS]
        else:
            train = split[TRAIN]
            train_counts = train | "CountTrain" >> beam.Map(lambda d: st.kept(TRAIN, len(d[2].encode("utf-8"))))
        written = {
            TRAIN: train | "WriteTrain" >> WriteJsonl(storage.join(self.output, TRAIN), cfg.num_shards),
            VALIDATION: split[VALIDATION] | "WriteValidation" >> WriteJsonl(storage.join(self.output, VALIDATION),
                                                                            cfg.validation_shards),
        }

        outcomes = (
            read[FILES],
            read[FAILED] | "CountFailed" >> beam.Map(lambda f: st.failed(f[0])),
            cleaned[DROPPED] | "CountDropped" >> beam.Map(st.dropped),
            dedup[DUPLICATES] | "CountDuplicates" >> beam.Map(st.duplicate),
            dedup[COUNTS],
            train_counts,
            split[VALIDATION] | "CountValidation" >> beam.Map(
                lambda d: st.kept(VALIDATION, len(d[2].encode("utf-8")))),
        )
        examples = (read[FAILED]
                    | "ExampleLines" >> beam.Map(lambda f: (f[0], f"{f[1]}: {f[2]}"))
                    | "FirstExamples" >> beam.combiners.Top.SmallestPerKey(st.EXAMPLES_PER_REASON))
        return (outcomes
                | "AllOutcomes" >> beam.Flatten()
                | "SumCounters" >> beam.CombineGlobally(SumCountersFn())
                | "WriteStats" >> beam.ParDo(
                    WriteStatsFn(storage.join(self.output, STATS_FILE), self.inputs, self.files, self.skipped),
                    AsList(examples), AsList(written[TRAIN]), AsList(written[VALIDATION])))


# --- Driver --------------------------------------------------------------------------------

def _flag_value(args: list[str], name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` in ``args`` (the last one), else None."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


DIRECT_RUNNERS = ("directrunner", "direct", "switchingdirectrunner")


def beam_options(beam_args: list[str] | None = None, workers: int | None = None) -> list[str]:
    """Pipeline arguments: DirectRunner unless a runner is given; ``workers`` -> its options.

    ``workers`` only applies to the DirectRunner: 1 runs in-process, N > 1 in N worker
    processes (``--direct_num_workers=N --direct_running_mode=multi_processing``). Everything
    else passes through unchanged (Dataflow, Flink, Spark options...).
    """
    args = list(beam_args or [])
    runner = _flag_value(args, "runner")
    if runner is None:
        args.append("--runner=DirectRunner")
        runner = "DirectRunner"
    direct = runner.lower() in DIRECT_RUNNERS
    if direct and _flag_value(args, "default_sdk_harness_log_level") is None:
        # Local worker processes otherwise log every channel they open at INFO.
        args.append("--default_sdk_harness_log_level=WARNING")
    if direct and _flag_value(args, "sdk_harness_log_level_overrides") is None:
        # ... and warn at start-up that they have no staged session (a local worker needs
        # none) and that they do not know the DirectRunner's own options: nothing to act on.
        args.append('--sdk_harness_log_level_overrides={"__main__": "ERROR", '
                    '"apache_beam.options.pipeline_options": "ERROR"}')
    if direct and workers is not None and _flag_value(args, "direct_num_workers") is None:
        if workers > 1:
            args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
        else:
            args += ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
    return args


def local_runner(options: PipelineOptions):
    """The engine the DirectRunner runs batch pipelines on (Beam's FnApiRunner), built directly.

    Beam's ``DirectRunner`` first tries to download and start the Prism runner, which fails
    or stalls offline before it falls back to this engine; building it here skips that
    attempt. The pipeline options are handed to the worker processes as DirectRunner does.
    """
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def without_timed_flush() -> None:
    """Turn off the timed flushing of the data that Beam's local engine (FnApiRunner, in this
    process) sends to its worker processes over gRPC.

    That engine's data server buffers what it sends in a stream that a background thread
    flushes every second (``worker_handlers.DATA_BUFFER_TIME_LIMIT_MS``). Beam 2.77's stream
    takes its buffered bytes, hands them to the send queue and only then clears itself; when
    the send queue is full (100 MB), the hand-over blocks, the engine goes on writing, and
    whatever it writes meanwhile is cleared unsent. A worker then gets part of its share
    and nothing fails. On the 502 MB benchmark corpus with 2 workers this cost about half of
    the duplicate marks, and some documents, in 5 of 25 runs (docs/extract.md). With the
    limit at 0 the engine sends each share whole when it closes the stream, as the workers
    themselves do. The engine runs batch pipelines here, so the timed flush (a streaming
    latency bound) buys nothing. Dataflow, Flink and Spark do not run this code."""
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0


def make_pipeline(args: list[str]) -> beam.Pipeline:
    """A ``beam.Pipeline`` for ``args``; DirectRunner pipelines run on :func:`local_runner`.
    Engines that run in this process (the DirectRunner's, and the portable runner's embedded
    job service) send their workers data without the timed flush (:func:`without_timed_flush`)."""
    options = PipelineOptions(args)
    runner = _flag_value(args, "runner") or "DirectRunner"
    if runner.lower() in DIRECT_RUNNERS:
        without_timed_flush()
        return beam.Pipeline(runner=local_runner(options), options=options)
    if (_flag_value(args, "job_endpoint") or "").lower() == "embed":
        without_timed_flush()
    return beam.Pipeline(options=options)


def _clear_previous(output: str) -> None:
    """Remove shards and stats of an earlier run into ``output`` (only those files), and the
    temporary files of one that was killed while writing them."""
    for split in SPLITS:
        d = storage.join(output, split)
        if storage.exists(d):
            for f in storage.list_files(d):
                name = f.rsplit("/", 1)[-1]
                if (name.startswith("part-") and name.endswith(".jsonl")) or \
                        (name.startswith(".part-") and name.endswith(".tmp")):
                    storage.remove(f)
    stats = storage.join(output, STATS_FILE)
    if storage.exists(stats):
        storage.remove(stats)
    if not storage.is_remote(output) and os.path.isdir(output):
        for name in os.listdir(output):
            if name.startswith(f".{STATS_FILE}.") and name.endswith(".tmp"):
                os.remove(os.path.join(output, name))


def build_pipeline(p: beam.Pipeline, files: list[str], skipped: list[str], inputs: list[str], output: str,
                   cfg: ExtractConfig):
    """Adds the extract step for ``files`` to pipeline ``p``; returns the stats PCollection."""
    # Create reshuffles its elements, so the files spread over the workers.
    return (p
            | "ListFiles" >> beam.Create(sorted(relative_names(inputs, files).items()))
            | "Extract" >> ExtractDocuments(cfg, output, inputs, len(files), skipped))


def extract(inputs: list[str], output: str, config: ExtractConfig | None = None,
            beam_args: list[str] | None = None, workers: int | None = None) -> dict[str, Any]:
    """Runs the extract step; returns the stats (also written to ``output/stats.json``).

    Raises ``FileNotFoundError`` when an input or a task file matches nothing, ``ValueError``
    when no input file has a known format or when not a single document could be read (every
    input failed; the stats file is still written and the error lists the reasons).
    """
    cfg = config or ExtractConfig()
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise ValueError("extract: no inputs given")
    files, skipped = expand_inputs(inputs)
    expand_task_files(cfg.decontaminate)  # a task file that matches nothing fails before anything is written
    if skipped:
        log.warning("skipping %d file(s) of unknown format (not .txt/.jsonl/.json/.html, optionally .gz), "
                    "e.g. %s", len(skipped), ", ".join(skipped[:3]))
    if not files:
        raise ValueError(f"extract: no file of a known format (.txt, .jsonl, .json, .html, each optionally .gz) "
                         f"in {inputs}; skipped: {skipped[:5]}")
    args = beam_options(beam_args, workers)
    stats_path = storage.join(output, STATS_FILE)
    start = time.perf_counter()
    stats, wrong = _run_once(args, files, skipped, inputs, output, cfg)
    if wrong and _local_processes(args) > 1:
        # The local multi-process engine used to lose elements it sent its workers (fixed by
        # without_timed_flush; see docs/extract.md). Should anything like it recur, the
        # counters made where the elements are made catch it; the 1-process mode, which
        # sends nothing over gRPC, has never disagreed, so the step is rerun there.
        kept = keep_attempt(output, wrong)
        log.warning("extract: on %d local worker processes the counts disagree with the runner's metrics "
                    "(%s); that attempt's output and counts are kept in %s; rerunning on 1 worker",
                    _local_processes(args), "; ".join(wrong), kept)
        first = {"workers": _local_processes(args), "disagreements": wrong, "kept_in": kept}
        stats, wrong = _run_once(_one_local_process(args), files, skipped, inputs, output, cfg)
        stats["reruns"] = [first]
        storage.write_text(stats_path, json.dumps(stats, indent=2, sort_keys=True) + "\n")
    if wrong:
        raise RuntimeError(f"extract: {stats_path} and the runner's committed Beam metrics disagree: "
                           + "; ".join(wrong))
    elapsed = time.perf_counter() - start
    log.info("extract: %s in %.1f s (%.2f MB/s in)", st.summary(stats), elapsed,
             stats["bytes_in"] / 1e6 / max(elapsed, 1e-9))
    n_failed = sum(stats["failed"].values())
    if n_failed and st.documents_read(stats):
        log.warning("extract: %d input(s) failed (%s); examples in %s under failed_examples", n_failed,
                    ", ".join(f"{k}={v}" for k, v in stats["failed"].items() if v), stats_path)
    if not stats["balanced"]:
        raise RuntimeError(f"extract: counts do not add up in {stats_path}: {st.summary(stats)}")
    if st.documents_read(stats) == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in stats["failed"].items() if v) or "no records"
        examples = "; ".join(e for v in stats["failed_examples"].values() for e in v[:1])
        raise ValueError(f"extract: nothing could be read from {inputs}: {reasons}"
                         + (f" (e.g. {examples})" if examples else ""))
    return stats


def keep_attempt(output: str, wrong: list[str]) -> str:
    """Move an attempt whose counts disagreed out of the way before the rerun writes
    ``output``: its shards and ``stats.json``, with the disagreements
    (``disagreements.json``), go to ``OUTPUT.attempt-1``, so what it wrote can be compared
    with the rerun's (were documents wrongly kept, or only miscounted?). A remote output
    keeps its ``stats.json`` and the disagreements there (copying every shard is left out).
    Returns where they are."""
    kept = output.rstrip("/") + ".attempt-1"
    if storage.exists(kept):
        storage.remove(kept)
    if storage.is_remote(output):
        if storage.exists(storage.join(output, STATS_FILE)):
            storage.copy(storage.join(output, STATS_FILE), storage.join(kept, STATS_FILE))
    else:
        os.replace(output, kept)
    storage.write_text(storage.join(kept, "disagreements.json"), json.dumps(wrong, indent=2) + "\n")
    return kept


def _run_once(args: list[str], files: list[str], skipped: list[str], inputs: list[str], output: str,
              cfg: ExtractConfig) -> tuple[dict[str, Any], list[str]]:
    """One run of the pipeline: (the stats it wrote, where they disagree with the runner's
    committed metrics; empty when they agree or the runner reports none)."""
    log.info("extract: %d files -> %s (%s)", len(files), output, " ".join(args))
    _clear_previous(output)
    p = make_pipeline(args)
    build_pipeline(p, files, skipped, inputs, output, cfg)
    result = p.run()
    result.wait_until_finish()
    stats_path = storage.join(output, STATS_FILE)
    if not storage.exists(stats_path):
        raise RuntimeError(f"extract: the pipeline finished without writing {stats_path}")
    stats = json.loads(storage.read_text(stats_path))
    metrics = runner_counts(result)
    if metrics is None:
        log.info("extract: the runner reports no committed Beam metrics; the counts come from the data alone")
        return stats, []
    wrong = disagreements(stats, metrics)
    if not wrong:
        log.info("extract: the counts in %s agree with the runner's committed Beam metrics (%d counters)",
                 stats_path, len(metrics))
    return stats, wrong


def _local_processes(args: list[str]) -> int:
    """How many worker processes the local DirectRunner runs ``args`` on (0: another runner,
    or threads)."""
    if (_flag_value(args, "runner") or "DirectRunner").lower() not in DIRECT_RUNNERS:
        return 0
    if (_flag_value(args, "direct_running_mode") or "in_memory") != "multi_processing":
        return 0
    return int(_flag_value(args, "direct_num_workers") or 1)


def _one_local_process(args: list[str]) -> list[str]:
    """``args`` with the DirectRunner on one in-process worker."""
    drop = ("--direct_num_workers", "--direct_running_mode")
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in drop:
            skip = True  # "--name value"
        elif a.split("=", 1)[0] not in drop:
            kept.append(a)
    return kept + ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def runner_counts(result) -> dict[str, int] | None:
    """The committed values of this step's Beam counters on the pipeline result, summed
    over steps, or None when the runner reports no committed metrics (attempted values
    alone may count a retried bundle twice)."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except (NotImplementedError, AttributeError, KeyError):
        return None
    out: dict[str, int] = {}
    for c in counters:
        if c.committed is None:
            return None
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed)
    return out or None


def disagreements(stats: dict[str, Any], metrics: dict[str, int]) -> list[str]:
    """Where ``stats.json`` (counted from the data) and the runner's counters differ: read,
    files, bytes in, kept per split, each rule's drops, each duplicate kind, the fuzzy pairs
    checked and found similar, each failure, each decontamination count."""
    get = lambda k: int(metrics.get(k, 0))  # noqa: E731
    failed = {r: get(f"failed_{r}") for r in stats["failed"]}
    want = {"read": get("docs_read") + sum(failed.values()), "files_read": get("files_read"),
            "bytes_in": get("bytes_in"),
            **{f"splits.{s}.docs": get(f"kept_{s}") for s in stats["splits"]},
            **{f"dropped.{r}": get(f"dropped_{r}") for r in stats["dropped"]},
            **{f"duplicates.{k}": get(f"duplicates_{k}") for k in stats["duplicates"]},
            **{f"fuzzy.{k}": get(f"fuzzy_{k}") for k in ("pairs_checked", "pairs_similar")},
            **{f"failed.{r}": n for r, n in failed.items()},
            **{f"decontaminated.{k}": get(f"decontaminated_{k}") for k in st.DECONTAMINATION_COUNTS}}
    got = {"read": stats["read"], "files_read": stats["files_read"], "bytes_in": stats["bytes_in"],
           **{f"splits.{s}.docs": v["docs"] for s, v in stats["splits"].items()},
           **{f"dropped.{r}": n for r, n in stats["dropped"].items()},
           **{f"duplicates.{k}": n for k, n in stats["duplicates"].items()},
           **{f"fuzzy.{k}": stats["fuzzy"][k] for k in ("pairs_checked", "pairs_similar")},
           **{f"failed.{r}": n for r, n in stats["failed"].items()},
           **{f"decontaminated.{k}": n for k, n in stats["decontaminated"].items()}}
    wrong = [f"{k}: {got[k]} in stats.json, {want[k]} in the metrics" for k in sorted(got) if got[k] != want[k]]
    made = sum(get(f"duplicates_{k}") for k in stats["duplicates"])
    if "marks_joined" in metrics and (get("marks_joined") != made or get("marks_without_document")):
        wrong.append(f"duplicate marks: {made} made, {get('marks_joined')} reached the documents' join, "
                     f"{get('marks_without_document')} of them without their document")
    return wrong


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry in the style of Beam's examples: our flags, then any Beam options."""
    parser = argparse.ArgumentParser(description="Clean, filter, deduplicate and split raw text.")
    parser.add_argument("--input", action="append", required=True,
                        help="file, directory or glob, local, gs:// or s3:// (repeatable)")
    parser.add_argument("--output", required=True, help="output directory, local, gs:// or s3://")
    parser.add_argument("--config", help="YAML file with ExtractConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--workers", type=int, default=None, help="DirectRunner worker processes")
    known, beam_args = parser.parse_known_args(argv)
    cfg = load_config(ExtractConfig, known.config, known.set)
    return extract(known.input, known.output, cfg, beam_args, workers=known.workers)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    try:
        run()
    except ConfigError as e:
        raise SystemExit(f"configuration error: {e}") from None
