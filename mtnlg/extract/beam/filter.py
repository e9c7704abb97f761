"""Clean and filter: documents -> cleaned documents that pass the quality rules, and the
name of the rule each dropped document broke."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from mtnlg.extract.beam.common import DROPPED, NAMESPACE, Doc
from mtnlg.extract.clean import clean_text
from mtnlg.extract.config import ExtractConfig, FilterConfig
from mtnlg.extract.filters import first_failing_rule


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


class CleanAndFilter(beam.PTransform):
    """Documents -> ``docs`` (cleaned, passing every rule) and ``dropped`` (one rule name per
    dropped document, counted into ``stats.json``'s ``dropped``).

    Each further judgement of a document's quality is one more DoFn after ``Rules`` that
    passes a document on or emits its reason on ``dropped``; their ``dropped`` outputs are
    flattened here, so the rest of the pipeline sees one stream of kept documents and one of
    reasons."""

    def __init__(self, cfg: ExtractConfig, output: str | None = None):
        super().__init__()
        self.cfg, self.output = cfg, output

    def expand(self, docs):
        ruled = docs | "Rules" >> beam.ParDo(CleanAndFilterFn(self.cfg.filters)).with_outputs(DROPPED, main="docs")
        kept, dropped = ruled.docs, [ruled[DROPPED]]
        if self.cfg.quality.enabled:  # scored documents go on as (id, source, text, score)
            from mtnlg.extract.quality_beam import QualityFilter

            judged = {"read": docs, "passed": kept} | "QualityClassifier" >> QualityFilter(self.cfg, self.output)
            kept = judged["docs"]
            dropped.append(judged[DROPPED])
        return {"docs": kept, DROPPED: tuple(dropped) | "AllDropped" >> beam.Flatten()}
