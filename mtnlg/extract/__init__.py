"""The extract step: raw text/JSONL/HTML -> clean, filtered, deduplicated train/validation JSONL.

``mtnlg.extract.beam_job.extract(inputs, output, config, beam_args)`` runs it on Apache Beam;
``mtnlg.extract.reference.extract_reference`` is the same logic as one plain Python loop.
See docs/extract.md.
"""
