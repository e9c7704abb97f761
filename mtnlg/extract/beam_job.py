"""The extract step as an Apache Beam job: read -> clean and filter -> dedup -> split -> write.

    files --Read--> documents --CleanAndFilter--> clean documents --Deduplicate--> unique
          \\-> failed            \\-> dropped                       \\-> duplicates
    unique --Split--> train / validation --WriteJsonl (by id hash, sorted)--> DIR/{train,validation}/part-*.jsonl
                      train --Decontaminate (validation's and task files' n-grams)--> train records
    every outcome --Stats--> DIR/stats.json

Elements are whole documents (one text file, JSONL line or HTML page), never lines: Beam's
per-element cost would dominate otherwise. Each step counts what it does with
``Metrics.counter``; the exact numbers in ``stats.json`` come from the data itself (every
document ends in exactly one outcome, summed by a combiner), so they do not depend on a
runner reporting metrics. The pieces live in ``mtnlg.extract.beam`` (read, filter, dedup,
grouping, write, runner); this module composes them (:class:`ExtractDocuments`) and runs the
job: :func:`extract` (the library entry), its attempts, and :func:`run` (the command line).

Near-duplicate groups are always found inside Beam, by rounds of the large-star and
small-star operations (``beam.grouping.ConnectedComponents``), with no step that gathers the
edges or the documents, on every runner. On a local engine the job runs at most
:data:`FIRST_ROUNDS` rounds first, as many as every near-duplicate group met so far needs;
when some group had not yet converged (``stats.json``'s ``fuzzy.unconverged_nodes``), it
reruns with ``dedup.max_rounds``, so the groups are exact while the usual run pays for few
rounds (:func:`first_attempt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from typing import Any

from mtnlg.extract.beam.runner import beam_options, local_engine, local_processes, make_pipeline, one_local_process

import apache_beam as beam  # after the runner module: its log filter comes first
from apache_beam.pvalue import AsList

from mtnlg import storage
from mtnlg.config import ConfigError, load_config
from mtnlg.extract import stats as st
from mtnlg.extract.beam.common import COUNTS, DROPPED, DUPLICATES, FAILED, FILES, NAMESPACE
from mtnlg.extract.beam.dedup import Deduplicate
from mtnlg.extract.beam.filter import CleanAndFilter
from mtnlg.extract.beam.read import ReadDocuments
from mtnlg.extract.beam.write import SplitFn, SumCountersFn, WriteJsonl, WriteStatsFn
from mtnlg.extract.config import ExtractConfig
from mtnlg.extract.decontaminate import expand_task_files
from mtnlg.extract.decontaminate_beam import Decontaminate
from mtnlg.extract.readers import expand_inputs, relative_names
from mtnlg.extract.split import SPLITS, TRAIN, VALIDATION
from mtnlg.formats.rundir import STATS_FILE
from mtnlg.progress import get_logger

log = get_logger("mtnlg.extract")

# Rounds of the near-duplicate grouping in the first attempt of a job on a local engine
# (dedup.max_rounds if smaller). Near-duplicate groups converge in 2 or 3; a chain of n near-duplicates needs
# about log2(n). Each round is two groupings of the edges, and each grouping a stage with a
# fixed cost on every runner, whether or not there is anything to group.
FIRST_ROUNDS = 4


class ExtractDocuments(beam.PTransform):
    """The whole step on a PCollection of file paths; outputs the stats dict (one element)."""

    def __init__(self, cfg: ExtractConfig, output: str, inputs: list[str], files: int, skipped: list[str]):
        super().__init__()
        self.cfg, self.output, self.inputs, self.files, self.skipped = cfg, output, inputs, files, skipped

    def expand(self, paths):
        cfg = self.cfg
        read = paths | "Read" >> ReadDocuments(cfg)
        cleaned = read.docs | "CleanAndFilter" >> CleanAndFilter(cfg, self.output)
        dedup = cleaned["docs"] | "Deduplicate" >> Deduplicate(cfg.dedup)
        decontaminate = cfg.decontaminate.enabled
        split = dedup["unique"] | "Split" >> beam.ParDo(SplitFn(
            cfg.validation_fraction, cfg.seed, (VALIDATION,) if decontaminate else SPLITS)).with_outputs(
            VALIDATION, main=TRAIN)
        if decontaminate:
            cut = {TRAIN: split[TRAIN], VALIDATION: split[VALIDATION]} | "Decontaminate" >> Decontaminate(cfg)
            train, train_counts = cut[TRAIN], cut[COUNTS]
        else:
            train = split[TRAIN]
            train_counts = train | "CountTrain" >> beam.Map(lambda d: st.kept(TRAIN, len(d[2].encode("utf-8"))))
        written = {
            TRAIN: train | "WriteTrain" >> WriteJsonl(storage.join(self.output, TRAIN), cfg.num_shards),
            VALIDATION: split[VALIDATION] | "WriteValidation" >> WriteJsonl(storage.join(self.output, VALIDATION),
                                                                            cfg.validation_shards),
        }

        outcomes = (
            read[FILES],
            read[FAILED] | "CountFailed" >> beam.Map(lambda f: st.failed(f[0])),
            cleaned[DROPPED] | "CountDropped" >> beam.Map(st.dropped),
            dedup[DUPLICATES] | "CountDuplicates" >> beam.Map(st.duplicate),
            dedup[COUNTS],
            train_counts,
            split[VALIDATION] | "CountValidation" >> beam.Map(
                lambda d: st.kept(VALIDATION, len(d[2].encode("utf-8")))),
        )
        examples = (read[FAILED]
                    | "ExampleLines" >> beam.Map(lambda f: (f[0], f"{f[1]}: {f[2]}"))
                    | "FirstExamples" >> beam.combiners.Top.SmallestPerKey(st.EXAMPLES_PER_REASON))
        return (outcomes
                | "AllOutcomes" >> beam.Flatten()
                | "SumCounters" >> beam.CombineGlobally(SumCountersFn())
                | "WriteStats" >> beam.ParDo(
                    WriteStatsFn(storage.join(self.output, STATS_FILE), self.inputs, self.files, self.skipped),
                    AsList(examples), AsList(written[TRAIN]), AsList(written[VALIDATION])))


# --- The job ----------------------------------------------------------------------------------

def _clear_previous(output: str) -> None:
    """Remove shards and stats of an earlier run into ``output`` (only those files), and the
    temporary files of one that was killed while writing them."""
    for split in SPLITS:
        d = storage.join(output, split)
        if storage.exists(d):
            for f in storage.list_files(d):
                name = f.rsplit("/", 1)[-1]
                if (name.startswith("part-") and name.endswith(".jsonl")) or \
                        (name.startswith(".part-") and name.endswith(".tmp")):
                    storage.remove(f)
    stats = storage.join(output, STATS_FILE)
    if storage.exists(stats):
        storage.remove(stats)
    if not storage.is_remote(output) and os.path.isdir(output):
        for name in os.listdir(output):
            if name.startswith(f".{STATS_FILE}.") and name.endswith(".tmp"):
                os.remove(os.path.join(output, name))


def build_pipeline(p: beam.Pipeline, files: list[str], skipped: list[str], inputs: list[str], output: str,
                   cfg: ExtractConfig):
    """Adds the extract step for ``files`` to pipeline ``p``; returns the stats PCollection."""
    # Create reshuffles its elements, so the files spread over the workers.
    return (p
            | "ListFiles" >> beam.Create(sorted(relative_names(inputs, files).items()))
            | "Extract" >> ExtractDocuments(cfg, output, inputs, len(files), skipped))


def extract(inputs: list[str], output: str, config: ExtractConfig | None = None,
            beam_args: list[str] | None = None, workers: int | None = None) -> dict[str, Any]:
    """Runs the extract step; returns the stats (also written to ``output/stats.json``).

    Raises ``FileNotFoundError`` when an input or a task file matches nothing, ``ValueError``
    when no input file has a known format or when not a single document could be read (every
    input failed; the stats file is still written and the error lists the reasons).
    """
    cfg = config or ExtractConfig()
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise ValueError("extract: no inputs given")
    files, skipped = expand_inputs(inputs)
    expand_task_files(cfg.decontaminate)  # a task file that matches nothing fails before anything is written
    if skipped:
        log.warning("skipping %d file(s) of unknown format (not .txt/.jsonl/.json/.html, optionally .gz), "
                    "e.g. %s", len(skipped), ", ".join(skipped[:3]))
    if not files:
        raise ValueError(f"extract: no file of a known format (.txt, .jsonl, .json, .html, each optionally .gz) "
                         f"in {inputs}; skipped: {skipped[:5]}")
    args = beam_options(beam_args, workers)
    stats_path = storage.join(output, STATS_FILE)
    start = time.perf_counter()
    first = first_attempt(cfg, args)
    stats, wrong = _run_once(args, files, skipped, inputs, output, first)
    reruns: list[dict[str, Any]] = []
    if wrong and local_processes(args) > 1:
        # The local multi-process engine used to lose elements it sent its workers (fixed by
        # without_timed_flush; see docs/extract.md). Should anything like it recur, the
        # counters made where the elements are made catch it; the 1-process mode, which
        # sends nothing over gRPC, has never disagreed, so the step is rerun there.
        kept = keep_attempt(output, wrong)
        log.warning("extract: on %d local worker processes the counts disagree with the runner's metrics "
                    "(%s); that attempt's output and counts are kept in %s; rerunning on 1 worker",
                    local_processes(args), "; ".join(wrong), kept)
        reruns.append({"workers": local_processes(args), "disagreements": wrong, "kept_in": kept})
        args = one_local_process(args)
        stats, wrong = _run_once(args, files, skipped, inputs, output, first)
    unconverged = stats["fuzzy"]["unconverged_nodes"]
    if unconverged and not wrong and first is not cfg:
        # Some near-duplicate group needs more rounds than the first attempt ran: the groups
        # are exact only once every one has converged (until then a node can only be kept
        # when it should have gone), so the step reruns with all the rounds it may take.
        log.warning("extract: %d near-duplicate(s) not yet in their final group after %d rounds; "
                    "rerunning with dedup.max_rounds=%d", unconverged, first.dedup.max_rounds, cfg.dedup.max_rounds)
        reruns.append({"rounds": first.dedup.max_rounds, "unconverged_nodes": unconverged})
        stats, wrong = _run_once(args, files, skipped, inputs, output, cfg)
    if reruns:
        stats["reruns"] = reruns
        storage.write_text(stats_path, json.dumps(stats, indent=2, sort_keys=True) + "\n")
    if wrong:
        raise RuntimeError(f"extract: {stats_path} and the runner's committed Beam metrics disagree: "
                           + "; ".join(wrong))
    elapsed = time.perf_counter() - start
    log.info("extract: %s in %.1f s (%.2f MB/s in)", st.summary(stats), elapsed,
             stats["bytes_in"] / 1e6 / max(elapsed, 1e-9))
    n_failed = sum(stats["failed"].values())
    if n_failed and st.documents_read(stats):
        log.warning("extract: %d input(s) failed (%s); examples in %s under failed_examples", n_failed,
                    ", ".join(f"{k}={v}" for k, v in stats["failed"].items() if v), stats_path)
    if not stats["balanced"]:
        raise RuntimeError(f"extract: counts do not add up in {stats_path}: {st.summary(stats)}")
    if st.documents_read(stats) == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in stats["failed"].items() if v) or "no records"
        examples = "; ".join(e for v in stats["failed_examples"].values() for e in v[:1])
        raise ValueError(f"extract: nothing could be read from {inputs}: {reasons}"
                         + (f" (e.g. {examples})" if examples else ""))
    return stats


def first_attempt(cfg: ExtractConfig, args: list[str]) -> ExtractConfig:
    """``cfg`` for the job's first attempt: on an engine in this process (the DirectRunner's,
    the portable runner's ``--job_endpoint=embed``), with fuzzy deduplication on, at most
    :data:`FIRST_ROUNDS` rounds of the grouping; ``cfg`` itself elsewhere, or when that is
    all it allows. A local run is small enough that a fixed cost per stage is much of its
    time and a rerun is cheap; on Dataflow, Flink or Spark a rerun would cost the whole job
    again, and a stage's fixed cost is small beside the data it moves."""
    d = cfg.dedup
    if not d.fuzzy or d.max_rounds <= FIRST_ROUNDS or not local_engine(args):
        return cfg
    return dataclasses.replace(cfg, dedup=dataclasses.replace(d, max_rounds=FIRST_ROUNDS))


def keep_attempt(output: str, wrong: list[str]) -> str:
    """Move an attempt whose counts disagreed out of the way before the rerun writes
    ``output``: its shards and ``stats.json``, with the disagreements
    (``disagreements.json``), go to ``OUTPUT.attempt-1``, so what it wrote can be compared
    with the rerun's (were documents wrongly kept, or only miscounted?). A remote output
    keeps its ``stats.json`` and the disagreements there (copying every shard is left out).
    Returns where they are."""
    kept = output.rstrip("/") + ".attempt-1"
    if storage.exists(kept):
        storage.remove(kept)
    if storage.is_remote(output):
        if storage.exists(storage.join(output, STATS_FILE)):
            storage.copy(storage.join(output, STATS_FILE), storage.join(kept, STATS_FILE))
    else:
        os.replace(output, kept)
    storage.write_text(storage.join(kept, "disagreements.json"), json.dumps(wrong, indent=2) + "\n")
    return kept


def _run_once(args: list[str], files: list[str], skipped: list[str], inputs: list[str], output: str,
              cfg: ExtractConfig) -> tuple[dict[str, Any], list[str]]:
    """One run of the pipeline: (the stats it wrote, where they disagree with the runner's
    committed metrics; empty when they agree or the runner reports none)."""
    log.info("extract: %d files -> %s (%s)", len(files), output, " ".join(args))
    _clear_previous(output)
    p = make_pipeline(args)
    build_pipeline(p, files, skipped, inputs, output, cfg)
    result = p.run()
    result.wait_until_finish()
    stats_path = storage.join(output, STATS_FILE)
    if not storage.exists(stats_path):
        raise RuntimeError(f"extract: the pipeline finished without writing {stats_path}")
    stats = json.loads(storage.read_text(stats_path))
    metrics = runner_counts(result)
    if metrics is None:
        log.info("extract: the runner reports no committed Beam metrics; the counts come from the data alone")
        return stats, []
    wrong = disagreements(stats, metrics)
    if not wrong:
        log.info("extract: the counts in %s agree with the runner's committed Beam metrics (%d counters)",
                 stats_path, len(metrics))
    return stats, wrong


def runner_counts(result) -> dict[str, int] | None:
    """The committed values of this step's Beam counters on the pipeline result, summed
    over steps, or None when the runner reports no committed metrics (attempted values
    alone may count a retried bundle twice)."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except (NotImplementedError, AttributeError, KeyError):
        return None
    out: dict[str, int] = {}
    for c in counters:
        if c.committed is None:
            return None
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(c.committed)
    return out or None


def disagreements(stats: dict[str, Any], metrics: dict[str, int]) -> list[str]:
    """Where ``stats.json`` (counted from the data) and the runner's counters differ: read,
    files, bytes in, kept per split, each rule's drops, each duplicate kind, the fuzzy pairs
    checked and found similar, each failure, each decontamination count."""
    get = lambda k: int(metrics.get(k, 0))  # noqa: E731
    failed = {r: get(f"failed_{r}") for r in stats["failed"]}
    want = {"read": get("docs_read") + sum(failed.values()), "files_read": get("files_read"),
            "bytes_in": get("bytes_in"),
            **{f"splits.{s}.docs": get(f"kept_{s}") for s in stats["splits"]},
            **{f"dropped.{r}": get(f"dropped_{r}") for r in stats["dropped"]},
            **{f"duplicates.{k}": get(f"duplicates_{k}") for k in stats["duplicates"]},
            **{f"fuzzy.{k}": get(f"fuzzy_{k}") for k in ("pairs_checked", "pairs_similar")},
            **{f"failed.{r}": n for r, n in failed.items()},
            **{f"decontaminated.{k}": get(f"decontaminated_{k}") for k in st.DECONTAMINATION_COUNTS}}
    got = {"read": stats["read"], "files_read": stats["files_read"], "bytes_in": stats["bytes_in"],
           **{f"splits.{s}.docs": v["docs"] for s, v in stats["splits"].items()},
           **{f"dropped.{r}": n for r, n in stats["dropped"].items()},
           **{f"duplicates.{k}": n for k, n in stats["duplicates"].items()},
           **{f"fuzzy.{k}": stats["fuzzy"][k] for k in ("pairs_checked", "pairs_similar")},
           **{f"failed.{r}": n for r, n in stats["failed"].items()},
           **{f"decontaminated.{k}": n for k, n in stats["decontaminated"].items()}}
    wrong = [f"{k}: {got[k]} in stats.json, {want[k]} in the metrics" for k in sorted(got) if got[k] != want[k]]
    made = sum(get(f"duplicates_{k}") for k in stats["duplicates"])
    if "marks_joined" in metrics and (get("marks_joined") != made or get("marks_without_document")):
        wrong.append(f"duplicate marks: {made} made, {get('marks_joined')} reached the documents' join, "
                     f"{get('marks_without_document')} of them without their document")
    return wrong


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry in the style of Beam's examples: our flags, then any Beam options."""
    parser = argparse.ArgumentParser(description="Clean, filter, deduplicate and split raw text.")
    parser.add_argument("--input", action="append", required=True,
                        help="file, directory or glob, local, gs:// or s3:// (repeatable)")
    parser.add_argument("--output", required=True, help="output directory, local, gs:// or s3://")
    parser.add_argument("--config", help="YAML file with ExtractConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--workers", type=int, default=None, help="DirectRunner worker processes")
    known, beam_args = parser.parse_known_args(argv)
    cfg = load_config(ExtractConfig, known.config, known.set)
    return extract(known.input, known.output, cfg, beam_args, workers=known.workers)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    try:
        run()
    except ConfigError as e:
        raise SystemExit(f"configuration error: {e}") from None
