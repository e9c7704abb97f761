"""The quality classifier (``mtnlg.extract.quality``) as Beam transforms.

    documents read --SampleNegatives (Top: n smallest sample keys)--> [(id, text)] --\\
    documents read --Count--> n -------------------------------------------------------+--TrainQualityClassifier--> JSON
    documents that passed the rules --QualityFilter (the JSON as a side input)--> (id, source, text, score)
                                                                     \\--dropped--> "quality_classifier"

With ``quality.classifier`` set, nothing is trained: every worker loads that file once
(``setup``). Otherwise the classifier is trained in one place, on ``quality.reference``
against the negative sample, written to its save path, and handed to every worker whole as
a side input (a few MB of JSON). The sample is the same documents as the reference loop's,
so both train the same classifier on the same texts in the same order.

The documents kept come out as ``(id, source, text, score)``: the score is written with
them. Counters: ``dropped_quality_classifier`` (what ``stats.json`` counts under
``dropped.quality_classifier``), ``quality_scored`` and ``quality_kept``.
"""

from __future__ import annotations

import functools

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton, TaggedOutput

from mtnlg.extract import stats as st
from mtnlg.extract.clean import clean_text
from mtnlg.extract.config import ExtractConfig, QualityConfig
from mtnlg.extract.quality import (RULE, QualityClassifier, keep, reference_texts, sample_key, sample_warning,
                                   save_path, train_classifier)
from mtnlg.progress import get_logger

DROPPED = "dropped"  # the output of documents the classifier drops (the rule's name)
log = get_logger("mtnlg.extract")


def _sample_order(seed: int, item: tuple[str, str]) -> tuple[int, str]:
    return sample_key(item[0], seed), item[0]


class QualityFilterFn(beam.DoFn):
    """A document ``(id, source, text)`` that passed the rules -> ``(id, source, text,
    score)`` when the keep rule keeps it, else ``"quality_classifier"`` on ``dropped``.

    The classifier is the file ``classifier`` (local, gs:// or s3://), loaded once per worker,
    or the JSON handed to ``process`` as a side input (parsed once per worker and value)."""

    def __init__(self, alpha: float, classifier: str | None = None):
        self.alpha, self.classifier = alpha, classifier
        self.scored = Metrics.counter(st.METRICS_NAMESPACE, "quality_scored")
        self.kept = Metrics.counter(st.METRICS_NAMESPACE, "quality_kept")
        self.dropped = Metrics.counter(st.METRICS_NAMESPACE, f"dropped_{RULE}")

    def setup(self):
        self._model = QualityClassifier.load(self.classifier) if self.classifier else None
        self._from_json: tuple[str | None, QualityClassifier | None] = (None, None)

    def _model_for(self, model_json: str | None) -> QualityClassifier:
        if model_json is None:
            if self._model is None:
                raise ValueError("QualityFilterFn: no classifier (give a file or a side input)")
            return self._model
        if self._from_json[0] is not model_json:
            self._from_json = (model_json, QualityClassifier.from_json(model_json, "the trained classifier"))
        return self._from_json[1]

    def process(self, doc: tuple[str, str, str], model_json: str | None = None):
        doc_id, source, text = doc
        score = self._model_for(model_json).score(text)
        self.scored.inc()
        if keep(doc_id, score, self.alpha):
            self.kept.inc()
            yield doc_id, source, text, score
        else:
            self.dropped.inc()
            yield TaggedOutput(DROPPED, RULE)


def train_from_sample(sample: list[tuple[str, str]], documents: int, cfg: ExtractConfig,
                      output: str | None) -> str:
    """The sampled raw documents -> the trained classifier's JSON (also saved)."""
    q = cfg.quality
    ordered = sorted(sample, key=functools.partial(_sample_order, q.seed))
    warning = sample_warning(len(ordered), documents)
    if warning:
        log.warning(warning)
    model = train_classifier(reference_texts(q, cfg.max_doc_bytes, cfg.max_binary_fraction),
                             [clean_text(text) for _, text in ordered])
    path = save_path(q, output)
    if path:
        model.save(path)
    return model.to_json()


class TrainQualityClassifier(beam.PTransform):
    """Documents read ``(id, source, raw text)`` -> the classifier's JSON (one element),
    trained on ``quality.reference`` against ``quality.negatives`` of them."""

    def __init__(self, cfg: ExtractConfig, output: str | None):
        super().__init__()
        self.cfg, self.output = cfg, output

    def expand(self, docs):
        q = self.cfg.quality
        sample = (docs
                  | "IdAndText" >> beam.Map(lambda d: (d[0], d[2]))
                  | "SampleNegatives" >> beam.combiners.Top.Of(
                      q.negatives, key=functools.partial(_sample_order, q.seed), reverse=True))
        count = docs | "CountDocuments" >> beam.combiners.Count.Globally()
        return sample | "TrainClassifier" >> beam.Map(train_from_sample, AsSingleton(count), self.cfg, self.output)


class QualityFilter(beam.PTransform):
    """``{"read": documents read, "passed": documents that passed the rules}`` ->
    ``{"docs": (id, source, text, score) kept, "dropped": the rule's name per drop}``."""

    def __init__(self, cfg: ExtractConfig, output: str | None):
        super().__init__()
        self.cfg, self.output = cfg, output

    def expand(self, docs):
        q: QualityConfig = self.cfg.quality
        if q.classifier:
            fn, side = QualityFilterFn(q.alpha, q.classifier), []
        else:
            trained = docs["read"] | "Train" >> TrainQualityClassifier(self.cfg, self.output)
            fn, side = QualityFilterFn(q.alpha), [AsSingleton(trained)]
        out = docs["passed"] | "ScoreAndKeep" >> beam.ParDo(fn, *side).with_outputs(DROPPED, main="docs")
        return {"docs": out["docs"], DROPPED: out[DROPPED]}
