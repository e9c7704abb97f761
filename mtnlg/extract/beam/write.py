"""Join and write: duplicate marks joined back with the documents by id, the train/validation
split, the sorted JSONL shards, and the counters summed into ``stats.json``."""

from __future__ import annotations

import hashlib
import json

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from mtnlg import storage
from mtnlg.extract import stats as st
from mtnlg.extract.beam.common import DUPLICATES, NAMESPACE, Doc
from mtnlg.extract.split import SPLITS, TRAIN, VALIDATION, split_of


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
        for rest in docs:   # (source, text[, quality score])
            if marks:
                yield TaggedOutput(DUPLICATES, marks[0])
            else:
                yield doc_id, *rest


class DropMarked(beam.PTransform):
    """``{"docs": documents, "marks": (id, kind)}`` -> the unmarked documents (``unique``)
    and one kind per marked document (``duplicates``): the texts meet their marks once, here."""

    def expand(self, inputs):
        by_id = inputs["docs"] | "KeyById" >> beam.Map(lambda doc: (doc[0], tuple(doc[1:])))
        return ({"doc": by_id, "dup": inputs["marks"]}
                | "JoinMarks" >> beam.CoGroupByKey()
                | "DropDuplicates" >> beam.ParDo(DropDuplicatesFn()).with_outputs(DUPLICATES, main="unique"))


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


def to_json_line(doc: Doc) -> str:
    """A document's record: id, text, source, and the quality classifier's score when it ran."""
    doc_id, source, text, *score = doc
    record = {"id": doc_id, "text": text, "source": source} | ({"quality_score": score[0]} if score else {})
    return json.dumps(record, ensure_ascii=False)


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
        # a few keys: no reshuffle, which would cost a grouping stage of its own
        every = docs.pipeline | "AllShards" >> beam.Create([(k, None) for k in range(n)], reshuffle=False)
        return ((keyed, every)
                | "WithEmptyShards" >> beam.Flatten()
                | "GroupShards" >> beam.GroupByKey()
                | "WriteShards" >> beam.ParDo(WriteShardFn(self.directory, n)))


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
