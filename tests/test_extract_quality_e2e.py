"""The quality classifier in the whole extract job (Beam, worker processes) against the
reference loop; the unit checks are tests/test_extract_quality.py, whose corpus this reuses."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e
pytest.importorskip("sklearn")

from mtnlg.config import replace  # noqa: E402
from mtnlg.extract.config import ExtractConfig  # noqa: E402
from mtnlg.extract.quality import DEFAULT_FILE  # noqa: E402
from mtnlg.extract.reference import extract_reference  # noqa: E402

from test_extract_quality import bad_texts, bench, good_texts, raw_input  # noqa: E402,F401  (fixtures)


def test_the_extract_job_with_the_classifier_writes_what_the_reference_loop_writes(raw_input, tmp_path):
    """The whole Beam job on 2 worker processes, classifier on (trained in the job, then the
    saved file reused): the same files, byte for byte, and the same counts as the reference
    loop, the score in every record."""
    from mtnlg.extract.beam_job import extract

    cfg = replace(ExtractConfig(), [f'quality.reference=["{raw_input / "reference"}"]', "quality.negatives=30",
                                    "validation_fraction=0.2"])
    inputs = [str(raw_input / "input")]
    stats = extract(inputs, str(tmp_path / "beam"), cfg, beam_args=[], workers=2)
    want, ref = extract_reference(inputs, str(tmp_path / "ref"), cfg)
    assert stats["dropped"] == ref["dropped"] and stats["dropped"]["quality_classifier"] > 0
    assert stats["duplicates"] == ref["duplicates"]
    for split in ("train", "validation"):
        assert {k: stats["splits"][split][k] for k in ("docs", "bytes")} == \
            {k: ref["splits"][split][k] for k in ("docs", "bytes")}, split
        lines = [line for p in sorted((tmp_path / "beam" / split).glob("part-*")) for line in p.read_text().splitlines()]
        got = sorted((json.loads(line) for line in lines), key=lambda r: r["id"])
        assert got == want[split] and all(list(r) == ["id", "text", "source", "quality_score"] for r in got), split
    assert (tmp_path / "beam" / DEFAULT_FILE).read_text() == (tmp_path / "ref" / DEFAULT_FILE).read_text()

    reuse = replace(ExtractConfig(), [f"quality.classifier={tmp_path / 'beam' / DEFAULT_FILE}",
                                      "validation_fraction=0.2"])
    again = extract(inputs, str(tmp_path / "again"), reuse, beam_args=[], workers=1)
    assert again["dropped"] == stats["dropped"]
    for split in ("train", "validation"):
        assert [p.read_bytes() for p in sorted((tmp_path / "again" / split).glob("part-*"))] == \
            [p.read_bytes() for p in sorted((tmp_path / "beam" / split).glob("part-*"))], split
