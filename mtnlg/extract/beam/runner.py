"""Runner options: the pipeline arguments the step passes Beam, the local engine it runs on,
and the Beam start-up notices that ask nothing of a user, kept out of the step's log."""

from __future__ import annotations

import logging
import sys


class _WithoutApitoolsNotice(logging.Filter):
    """Importing Beam without its gcp extra logs "apitools not found, and bigquery client
    libraries are not available" on the root logger; the step uses no BigQuery, and its
    gs:// reads go through google-cloud-storage."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_WithoutApitoolsNotice())  # before Beam is imported

import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.portability import python_urns  # noqa: E402
from apache_beam.runners.portability.fn_api_runner import fn_runner  # noqa: E402


def flag_value(args: list[str], name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` in ``args`` (the last one), else None."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


DIRECT_RUNNERS = ("directrunner", "direct", "switchingdirectrunner")


def beam_options(beam_args: list[str] | None = None, workers: int | None = None) -> list[str]:
    """Pipeline arguments: DirectRunner unless a runner is given; ``workers`` -> its options.

    ``workers`` only applies to the DirectRunner: 1 runs in-process, N > 1 in N worker
    processes (``--direct_num_workers=N --direct_running_mode=multi_processing``). Everything
    else passes through unchanged (Dataflow, Flink, Spark options...).
    """
    args = list(beam_args or [])
    runner = flag_value(args, "runner")
    if runner is None:
        args.append("--runner=DirectRunner")
        runner = "DirectRunner"
    direct = runner.lower() in DIRECT_RUNNERS
    if direct and flag_value(args, "default_sdk_harness_log_level") is None:
        # Local worker processes otherwise log every channel they open at INFO.
        args.append("--default_sdk_harness_log_level=WARNING")
    if direct and flag_value(args, "sdk_harness_log_level_overrides") is None:
        # ... and warn at start-up that they have no staged session (a local worker needs
        # none) and that they do not know the DirectRunner's own options: nothing to act on.
        args.append('--sdk_harness_log_level_overrides={"__main__": "ERROR", '
                    '"apache_beam.runners.worker.sdk_worker_main": "ERROR", '
                    '"apache_beam.options.pipeline_options": "ERROR"}')
    if direct and workers is not None and flag_value(args, "direct_num_workers") is None:
        if workers > 1:
            args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
        else:
            args += ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
    return args


def local_runner(options: PipelineOptions):
    """The engine the DirectRunner runs batch pipelines on (Beam's FnApiRunner), built directly.

    Beam's ``DirectRunner`` first tries to download and start the Prism runner, which fails
    or stalls offline before it falls back to this engine; building it here skips that
    attempt. The pipeline options are handed to the worker processes as DirectRunner does.
    """
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return _LocalEngine(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


BEAM_WORKER = "-m apache_beam.runners.worker.sdk_worker_main"


class _LocalEngine(fn_runner.FnApiRunner):
    """Beam's local engine, its worker processes started as ``mtnlg.extract.beam.worker``
    (Beam's worker with the step's log filter in place; see that module)."""

    def run_via_runner_api(self, pipeline_proto, options):
        for env in pipeline_proto.components.environments.values():
            if env.urn == python_urns.SUBPROCESS_SDK and env.payload.decode().endswith(BEAM_WORKER):
                env.payload = f"{sys.executable} -m mtnlg.extract.beam.worker".encode()
        return super().run_via_runner_api(pipeline_proto, options)


def without_timed_flush() -> None:
    """Turn off the timed flushing of the data that Beam's local engine (FnApiRunner, in this
    process) sends to its worker processes over gRPC.

    That engine's data server buffers what it sends in a stream that a background thread
    flushes every second (``worker_handlers.DATA_BUFFER_TIME_LIMIT_MS``). Beam 2.77's stream
    takes its buffered bytes, hands them to the send queue and only then clears itself; when
    the send queue is full (100 MB), the hand-over blocks, the engine goes on writing, and
    whatever it writes meanwhile is cleared unsent. A worker then gets part of its share
    and nothing fails. On the 502 MB benchmark corpus with 2 workers this cost about half of
    the duplicate marks, and some documents, in 5 of 25 runs (docs/extract.md). With the
    limit at 0 the engine sends each share whole when it closes the stream, as the workers
    themselves do. The engine runs batch pipelines here, so the timed flush (a streaming
    latency bound) buys nothing. Dataflow, Flink and Spark do not run this code."""
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0


def local_engine(args: list[str]) -> bool:
    """Whether ``args`` run on an engine in this process: the DirectRunner's, or the
    portable runner's embedded job service (``--job_endpoint=embed``)."""
    runner = (flag_value(args, "runner") or "DirectRunner").lower()
    return runner in DIRECT_RUNNERS or (flag_value(args, "job_endpoint") or "").lower() == "embed"


def make_pipeline(args: list[str]) -> beam.Pipeline:
    """A ``beam.Pipeline`` for ``args``; DirectRunner pipelines run on :func:`local_runner`.
    Engines that run in this process (the DirectRunner's, and the portable runner's embedded
    job service) send their workers data without the timed flush (:func:`without_timed_flush`)."""
    options = PipelineOptions(args)
    if local_engine(args):
        without_timed_flush()
    if (flag_value(args, "runner") or "DirectRunner").lower() in DIRECT_RUNNERS:
        return beam.Pipeline(runner=local_runner(options), options=options)
    return beam.Pipeline(options=options)


def local_processes(args: list[str]) -> int:
    """How many worker processes the local DirectRunner runs ``args`` on (0: another runner,
    or threads)."""
    if (flag_value(args, "runner") or "DirectRunner").lower() not in DIRECT_RUNNERS:
        return 0
    if (flag_value(args, "direct_running_mode") or "in_memory") != "multi_processing":
        return 0
    return int(flag_value(args, "direct_num_workers") or 1)


def one_local_process(args: list[str]) -> list[str]:
    """``args`` with the DirectRunner on one in-process worker."""
    drop = ("--direct_num_workers", "--direct_running_mode")
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in drop:
            skip = True  # "--name value"
        elif a.split("=", 1)[0] not in drop:
            kept.append(a)
    return kept + ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
