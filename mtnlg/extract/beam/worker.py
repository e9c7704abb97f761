"""The local worker process of the extract step: Beam's SDK worker, started with the step's
log filter already in place.

With ``--direct_running_mode=multi_processing`` Beam's local engine starts each worker as
``python -m apache_beam.runners.worker.sdk_worker_main``; that process imports Beam before
any pipeline option reaches it, and the import logs "apitools not found ..." (a BigQuery
notice) once per worker. ``runner.local_runner`` starts ``python -m
mtnlg.extract.beam.worker`` instead: the same worker, after ``runner``'s filter."""

import logging
import sys

from mtnlg.extract.beam import runner  # noqa: F401  (its log filter, before Beam's worker is imported)
from apache_beam.runners.worker import sdk_worker_main  # noqa: E402

if __name__ == "__main__":
    # what the worker says of itself at start ("Logging handler created.", no staged session),
    # before the pipeline's log levels reach it, as when it runs as __main__
    logging.getLogger(sdk_worker_main.__name__).setLevel(logging.ERROR)
    sdk_worker_main.main(sys.argv)
