"""The numbers of an extract run, and the ``stats.json`` built from them.

Counts are computed from the data, not from runner metrics (which some runners do not
report): every document that was read ends in exactly one outcome, each outcome becomes a
small counter dict, and the dicts are summed. Flat keys (``failed/binary``) keep that sum
trivial; ``build_stats`` nests them for the file:

``read``                       documents (and unreadable units) read = kept + dropped + duplicates
                               + failed + decontaminated.dropped_whole + decontaminated.emptied
``kept``                       documents written, whole or in pieces (without decontamination
                               pieces: ``splits.train.docs + splits.validation.docs``)
``dropped.<rule>``             documents dropped by each quality rule (all rules listed), the
                               quality classifier's drops last (``quality_classifier``)
``duplicates.exact|fuzzy``     documents dropped as duplicates of a kept one
``fuzzy.pairs_checked``        distinct candidate pairs compared; ``pairs_similar``: edges
``fuzzy.largest_bucket``       ids in the largest LSH bucket with a pair; ``largest_group``:
                               in the largest near-duplicate group (both by maximum)
``fuzzy.skipped_comparisons``  pairs in over-large LSH buckets not compared (star instead)
``fuzzy.unconverged_nodes``    near-duplicates whose group was not yet a star around its
                               smallest id after ``dedup.max_rounds`` rounds (0: every
                               group exact)
``failed.<reason>``            inputs that could not become a document (all reasons listed)
``decontaminated.documents``   training documents holding an evaluation n-gram; of them,
                               ``dropped_whole`` (cut into more than ``max_pieces`` pieces) and
                               ``emptied`` (no piece long enough) were not written, the others
                               were written as ``pieces`` records; ``matches``: n-grams cut out;
                               ``bytes_removed``: their UTF-8 bytes not written; ``ngrams``:
                               distinct evaluation n-grams; ``frequent_ngrams``: those not cut
                               (``frequent_documents``); ``task_texts``: texts of task files
``balanced``                   ``read == kept + dropped + duplicates + failed + dropped_whole + emptied``
``bytes_in`` / ``bytes_out``   bytes read (decompressed, before cleaning) / UTF-8 text written
``invalid_utf8_replacements``  invalid UTF-8 sequences replaced by U+FFFD
``splits.<split>``             ``docs`` (records: a piece is one), ``bytes`` and the ``files``
                               written for each split
``files``                      input files read; ``skipped_files``: directory entries that are
                               not a known format (count and the first names)
``failed_examples.<reason>``   up to five ``source: detail`` lines per reason
"""

from __future__ import annotations

from typing import Any, Iterable

from mtnlg.extract.config import RULES
from mtnlg.extract.readers import FAILURE_REASONS
from mtnlg.extract.split import SPLITS

METRICS_NAMESPACE = "mtnlg.extract"  # of the step's Beam counters
# The quality classifier's drops (mtnlg.extract.quality), counted after the rules'.
CLASSIFIER_RULE = "quality_classifier"
DROP_RULES = (*RULES, CLASSIFIER_RULE)
DUPLICATE_KINDS = ("exact", "fuzzy")
DECONTAMINATION_COUNTS = ("documents", "matches", "pieces", "dropped_whole", "emptied", "bytes_removed",
                          "ngrams", "frequent_ngrams", "task_texts")
# Decontamination outcomes that leave nothing of a document.
DECONTAMINATION_DROPS = ("dropped_whole", "emptied")
EXAMPLES_PER_REASON = 5


def failed(reason: str) -> dict[str, int]:
    return {f"failed/{reason}": 1}


def dropped(rule: str) -> dict[str, int]:
    return {f"dropped/{rule}": 1}


def duplicate(kind: str) -> dict[str, int]:
    return {f"duplicates/{kind}": 1}


def kept(split: str, nbytes: int) -> dict[str, int]:
    return {"kept": 1, "bytes_out": nbytes, f"splits/{split}/docs": 1, f"splits/{split}/bytes": nbytes}


def file_read(records: int, nbytes: int, replaced: int) -> dict[str, int]:
    return {"files_read": 1, "read": records, "bytes_in": nbytes, "invalid_utf8_replacements": replaced}


# Counters combined by their maximum, not their sum.
MAX_KEYS = ("fuzzy/largest_bucket", "fuzzy/largest_group")


def add(total: dict[str, int], part: dict[str, int]) -> dict[str, int]:
    """Add ``part`` into ``total`` (in place; the ``MAX_KEYS`` by maximum) and return ``total``."""
    for k, v in part.items():
        total[k] = max(total.get(k, 0), v) if k in MAX_KEYS else total.get(k, 0) + v
    return total


def build_stats(counters: dict[str, int], *, inputs: list[str], files: int, skipped: list[str],
                examples: dict[str, list[str]] | None = None,
                written: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The ``stats.json`` document from summed counters."""
    c = dict(counters)
    get = lambda k: int(c.get(k, 0))  # noqa: E731
    stats: dict[str, Any] = {
        "inputs": list(inputs),
        "files": files,
        "files_read": get("files_read"),
        "skipped_files": {"count": len(skipped), "examples": sorted(skipped)[:20]},
        "read": get("read"),
        "kept": get("kept"),
        "dropped": {r: get(f"dropped/{r}") for r in DROP_RULES},
        "duplicates": {k: get(f"duplicates/{k}") for k in DUPLICATE_KINDS},
        # distinct candidate pairs verified and found similar (the edges), the ids in the
        # largest LSH bucket with a pair and in the largest near-duplicate group (what one
        # step holds at most), comparisons huge buckets left out (checked against their
        # smallest id only), and nodes not yet in their final group (0: exact components)
        "fuzzy": {"pairs_checked": get("fuzzy/pairs_checked"), "pairs_similar": get("fuzzy/pairs_similar"),
                  "largest_bucket": get("fuzzy/largest_bucket"), "largest_group": get("fuzzy/largest_group"),
                  "skipped_comparisons": get("fuzzy/skipped_comparisons"),
                  "unconverged_nodes": get("fuzzy/unconverged_nodes")},
        "failed": {r: get(f"failed/{r}") for r in FAILURE_REASONS},
        "decontaminated": {k: get(f"decontaminated/{k}") for k in DECONTAMINATION_COUNTS},
        "bytes_in": get("bytes_in"),
        "bytes_out": get("bytes_out"),
        "invalid_utf8_replacements": get("invalid_utf8_replacements"),
        "splits": {s: {"docs": get(f"splits/{s}/docs"), "bytes": get(f"splits/{s}/bytes"),
                       "files": sorted((written or {}).get(s, []))} for s in SPLITS},
        "failed_examples": {k: sorted(v)[:EXAMPLES_PER_REASON] for k, v in sorted((examples or {}).items())},
    }
    accounted = (stats["kept"] + sum(stats["dropped"].values()) + sum(stats["duplicates"].values())
                 + sum(stats["failed"].values()) + sum(stats["decontaminated"][k] for k in DECONTAMINATION_DROPS))
    stats["balanced"] = accounted == stats["read"]
    return stats


def documents_read(stats: dict[str, Any]) -> int:
    """Documents that were read successfully (whatever happened to them afterwards)."""
    return stats["read"] - sum(stats["failed"].values())


def summary(stats: dict[str, Any]) -> str:
    """One line for logs: read, kept, dropped, duplicates, failed."""
    def nonzero(d: dict[str, int]) -> str:
        parts = [f"{k}={v}" for k, v in d.items() if v]
        return ", ".join(parts) or "none"
    return (f"read {stats['read']}, kept {stats['kept']} (train {stats['splits']['train']['docs']}, "
            f"validation {stats['splits']['validation']['docs']}), dropped [{nonzero(stats['dropped'])}], "
            f"duplicates [{nonzero(stats['duplicates'])}], failed [{nonzero(stats['failed'])}], "
            f"decontaminated [{nonzero({k: stats['decontaminated'][k] for k in DECONTAMINATION_COUNTS[:5]})}]")


def sum_counters(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for p in parts:
        add(total, p)
    return total
