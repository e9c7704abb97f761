"""Decontamination (``mtnlg.extract.decontaminate``) as Beam transforms.

    validation documents --n-grams--\\
    task files --read, clean, n-grams--+--union--> evaluation n-gram set (one element)
    [train documents --NgramHits--> documents per n-gram --> frequent n-gram set]  (frequent_documents)
    train documents --CutEvaluationNgrams (the set(s) as side inputs)--> records, counters

The evaluation n-grams travel as one side input: sorted 64-bit hashes, 8 bytes per
distinct n-gram, which every worker holds whole. That is about 8 bytes per word of
evaluation text: a validation split of 1 GB of text (200 million words) is a 1.6 GB set.
For a set that no worker can hold, the lookup becomes a join instead: key every training
n-gram hash with its (document id, word index), group by the hash with the evaluation
hashes (``CoGroupByKey``), keep the hashes found on both sides, group those hits by
document id and join them back to the documents, where the cutting runs as here with the
hits known. That sends every training n-gram through a shuffle (16 bytes or more per
training word), which is why the side input is used while the set fits.

Every count is made twice, as the rest of the step does: as a counter dict from the data
(summed into ``stats.json``) and as a Beam counter where it happens (``decontaminated_*``,
``kept_train``), which ``beam_job.disagreements`` compares.
"""

from __future__ import annotations

import functools

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton, TaggedOutput

from mtnlg.extract import stats as st
from mtnlg.extract.beam.common import COUNTS
from mtnlg.extract.config import DecontaminateConfig, ExtractConfig
from mtnlg.extract.decontaminate import (NgramSet, decontaminate_document, evaluation_ngrams, expand_task_files,
                                         ngram_hits, task_texts)
from mtnlg.extract.split import TRAIN, VALIDATION


class EvaluationNgramsFn(beam.CombineFn):
    """``{length: hashes}`` parts -> the ``NgramSet`` of their union (empty for no input)."""

    COMPACT = 256  # parts gathered before they are merged into one sorted array

    def create_accumulator(self):
        return {}

    def add_input(self, acc, part):
        for k, v in part.items():
            parts = acc.setdefault(k, [])
            parts.append(v)
            if len(parts) >= self.COMPACT:
                acc[k] = [np.unique(np.concatenate(parts))]
        return acc

    def merge_accumulators(self, accs):
        merged: dict = {}
        for acc in accs:
            for k, parts in acc.items():
                merged.setdefault(k, []).extend(parts)
        return {k: [np.unique(np.concatenate(v))] for k, v in merged.items()}

    def extract_output(self, acc):
        return NgramSet({k: np.concatenate(v) for k, v in acc.items()})


class ReadTaskTextsFn(beam.DoFn):
    """A task file -> its cleaned texts; a record that cannot be read fails the step."""

    def __init__(self, cfg: ExtractConfig):
        self.cfg = cfg
        self.texts = Metrics.counter(st.METRICS_NAMESPACE, "decontaminated_task_texts")

    def process(self, path: str):
        for text in task_texts(path, self.cfg.decontaminate, self.cfg.max_doc_bytes, self.cfg.max_binary_fraction):
            self.texts.inc()
            yield text


class CountNgramsFn(beam.DoFn):
    """An n-gram set -> ``{"decontaminated/<name>": its size}``."""

    def __init__(self, name: str):
        self.name = name
        self.ngrams = Metrics.counter(st.METRICS_NAMESPACE, f"decontaminated_{name}")

    def process(self, ngrams: NgramSet):
        self.ngrams.inc(len(ngrams))
        yield {f"decontaminated/{self.name}": len(ngrams)}


class NgramHitsFn(beam.DoFn):
    """A training document -> ``(length, hash)`` of each distinct evaluation n-gram in it."""

    def process(self, doc: tuple[str, str, str], ngrams: NgramSet):
        for k, hashes in ngram_hits(doc[2], ngrams).items():
            for h in hashes.tolist():
                yield k, h


class CutEvaluationNgramsFn(beam.DoFn):
    """A training document -> the records to write (itself, or its pieces), and on
    ``counts`` its outcome's counter dict."""

    COUNTED = ("documents", "matches", "pieces", "dropped_whole", "emptied", "bytes_removed")

    def __init__(self, cfg: DecontaminateConfig):
        self.cfg = cfg
        self.records = Metrics.counter(st.METRICS_NAMESPACE, f"kept_{TRAIN}")
        self.counters = {k: Metrics.counter(st.METRICS_NAMESPACE, f"decontaminated_{k}") for k in self.COUNTED}

    def setup(self):
        self._cut_set = (None, None, None)  # (ngrams, frequent, ngrams without frequent)

    def process(self, doc: tuple[str, str, str], ngrams: NgramSet, frequent: NgramSet | None = None):
        doc_id, source, text, *score = doc   # the quality score, when the classifier ran
        if frequent is not None:  # the side inputs are the same objects within a bundle
            if self._cut_set[0] is not ngrams or self._cut_set[1] is not frequent:
                self._cut_set = (ngrams, frequent, ngrams.without(frequent))
            ngrams = self._cut_set[2]
        records, counts = decontaminate_document(doc_id, text, ngrams, self.cfg)
        for record_id, record_text in records:
            yield record_id, source, record_text, *score
        self.records.inc(len(records))
        for k, counter in self.counters.items():
            n = counts.get(f"decontaminated/{k}", 0)
            if n:
                counter.inc(n)
        yield TaggedOutput(COUNTS, counts)


def _ngrams_of(ngram: int, min_ngram: int, text: str) -> dict:
    return evaluation_ngrams(text, ngram, min_ngram)


class Decontaminate(beam.PTransform):
    """``{"train": documents, "validation": documents}`` -> ``{"train": the train records
    to write, "counts": counter dicts}``. The task files are listed here, where the pipeline
    is built; a path that matches nothing raises ``FileNotFoundError``."""

    def __init__(self, cfg: ExtractConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, splits):
        d = self.cfg.decontaminate
        p = splits[TRAIN].pipeline
        ngrams_of = functools.partial(_ngrams_of, d.ngram, d.min_ngram)
        parts, counts = [], []
        if d.validation:
            parts.append(splits[VALIDATION] | "ValidationNgrams" >> beam.Map(lambda doc: ngrams_of(doc[2])))
        files = expand_task_files(d)
        if files:
            texts = (p
                     | "TaskFiles" >> beam.Create(files)
                     | "ReadTaskFiles" >> beam.ParDo(ReadTaskTextsFn(self.cfg)))
            parts.append(texts | "TaskNgrams" >> beam.Map(ngrams_of))
            counts.append(texts | "CountTaskTexts" >> beam.Map(lambda _: {"decontaminated/task_texts": 1}))
        ngrams = (tuple(parts)
                  | "AllEvaluationNgrams" >> beam.Flatten(pipeline=p)
                  | "EvaluationNgramSet" >> beam.CombineGlobally(EvaluationNgramsFn()))
        side = [AsSingleton(ngrams)]
        if d.frequent_documents:
            frequent = (splits[TRAIN]
                        | "NgramHits" >> beam.ParDo(NgramHitsFn(), AsSingleton(ngrams))
                        | "DocumentsPerNgram" >> beam.combiners.Count.PerElement()
                        | "FrequentNgrams" >> beam.Filter(lambda ngram_n, m: ngram_n[1] >= m, d.frequent_documents)
                        | "AsNgramPart" >> beam.Map(lambda kh_n: {kh_n[0][0]: np.array([kh_n[0][1]], np.uint64)})
                        | "FrequentNgramSet" >> beam.CombineGlobally(EvaluationNgramsFn()))
            side.append(AsSingleton(frequent))
            counts.append(frequent | "CountFrequentNgrams" >> beam.ParDo(CountNgramsFn("frequent_ngrams")))
        cut = splits[TRAIN] | "CutEvaluationNgrams" >> beam.ParDo(
            CutEvaluationNgramsFn(d), *side).with_outputs(COUNTS, main=TRAIN)
        counts += [cut[COUNTS], ngrams | "CountNgrams" >> beam.ParDo(CountNgramsFn("ngrams"))]
        return {TRAIN: cut[TRAIN], COUNTS: tuple(counts) | "DecontaminationCounts" >> beam.Flatten()}
