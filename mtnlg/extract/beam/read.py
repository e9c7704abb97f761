"""Reading: ``(path, relative name)`` pairs -> documents, failures and per-file counters."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from mtnlg.extract import stats as st
from mtnlg.extract.beam.common import FAILED, FILES, NAMESPACE
from mtnlg.extract.config import ExtractConfig
from mtnlg.extract.readers import Failure, read_file
from mtnlg.progress import Progress, get_logger

log = get_logger("mtnlg.extract")


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
