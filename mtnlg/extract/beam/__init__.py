"""The extract step's Beam pieces, one idea a module; ``mtnlg.extract.beam_job`` composes them.

* ``runner``: the pipeline's runner and options (the local engine, worker counts, the
  start-up notices filtered); imported first, so its log filter is in place before Beam is.
* ``common``: the output tags, the counter namespace and the document tuple every piece shares.
* ``read``: file paths -> documents (``ReadDocuments``).
* ``filter``: documents -> clean documents that pass the quality rules (``CleanAndFilter``).
* ``dedup``: documents -> duplicate marks, exact and fuzzy (``Deduplicate``).
* ``grouping``: near-duplicate pairs -> groups, inside Beam (``ConnectedComponents``).
* ``write``: marks joined back with the documents, the split, the JSONL shards and
  ``stats.json`` (``DropMarked``, ``SplitFn``, ``WriteJsonl``, ``WriteStatsFn``).
"""

from mtnlg.extract.beam import runner  # noqa: F401  (first: its log filter precedes Beam's import)
