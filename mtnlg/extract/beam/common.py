"""What every piece of the extract pipeline shares: output tags, the counter namespace, the
document tuple, and a DoFn base that reports a per-bundle maximum."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindows

from mtnlg.extract import stats as st

NAMESPACE = st.METRICS_NAMESPACE
FAILED, DROPPED, DUPLICATES, FILES = "failed", "dropped", "duplicates", "files"
COUNTS, UNCONVERGED, LARGEST = "counts", "unconverged", "largest"

# A document between steps: (id, source, text). Plain tuples of str travel through Beam's
# fast coder without pickling.
Doc = tuple[str, str, str]


class BundleMaximumFn(beam.DoFn):
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
