"""Trace one extract on the local multi-process DirectRunner: what each stage got and wrote.

A diagnostic for the intermittent 2-worker undercount (docs/extract.md, Throughput). It
patches, in the driver only, the FnApiRunner's bundle execution and its list buffers, so
the workers run unchanged code. It then runs `extract()` on the near-duplicate corpus of
`benchmarks/extract.py` with the filters off, and reports:

- stages that ran more than one bundle, or before a producer of one of their inputs;
- with --join-table, the documents' join table just before it is read (keys, and keys with
  a mark);
- for every list-buffer write of under 30 MB, its bytes and element count, to trace.json.

    .venv/bin/python benchmarks/extract_trace.py --mb 502 --workers 2 --dir /tmp/trace [--repeat 5]

The corpus is built once under --dir and reused. It stops at the first run whose counts
disagree (extract() then reruns on 1 worker and logs "rerunning on 1 worker"). This file
reads the runner's private state, which may change with any Beam release; the library
never does.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


class Tracer:
    def __init__(self, join_table: bool):
        self.bundles: list[dict] = []
        self.writes: list[dict] = []
        self.join_table = join_table
        self.stage = ""
        self.partitions: list[list[dict]] = []  # the join table's parts, as sent to the workers
        self.sent: list[dict] = []  # the join stage's input, per bundle part
        self.join_buffers: set[int] = set()
        self.in_join = False

    @staticmethod
    def describe(buf) -> dict:
        from apache_beam.runners.portability.fn_api_runner import execution

        if isinstance(buf, execution.GroupingBuffer):
            return {"kind": "group", "id": id(buf), "keys": len(buf._table), "read": buf._grouped_output is not None}
        if isinstance(buf, execution.ListBuffer):
            return {"kind": "list", "id": id(buf), "chunks": len(buf._inputs), "bytes": sum(map(len, buf._inputs))}
        return {"kind": type(buf).__name__}

    def install(self) -> None:
        from apache_beam.coders.coder_impl import create_InputStream
        from apache_beam.runners.portability.fn_api_runner import execution, fn_runner

        tracer = self
        run_bundle = fn_runner.FnApiRunner._execute_bundle

        def execute_bundle(runner, ctx, bcm, bundle_input):
            name = bcm.stage.name
            node = ctx.watermark_manager.get_stage_node(name)
            entry = {"stage": name, "inputs": {k: tracer.describe(v) for k, v in bundle_input.data.items()},
                     "producers": {i.name: sorted(p.name for p in i.producers) for i in node.inputs}}
            if tracer.join_table:
                for k, v in bundle_input.data.items():
                    if "JoinMarks" in k and isinstance(v, execution.GroupingBuffer):
                        tracer.join_buffers.add(id(v))
                        entry["join_table"] = {"keys": len(v._table),
                                               "keys_with_a_mark": sum(len(vs) > 1 for vs in v._table.values())}
                        print(f"join table: {entry['join_table']}", file=sys.stderr, flush=True)
            tracer.stage, t = name, time.perf_counter()
            tracer.in_join = any(id(v) in tracer.join_buffers for v in bundle_input.data.values())
            try:
                return run_bundle(runner, ctx, bcm, bundle_input)
            finally:
                entry["seconds"] = time.perf_counter() - t
                tracer.bundles.append(entry)

        list_append = execution.ListBuffer.append

        def append(buf, data):
            n = None
            if len(data) < 30_000_000:
                stream, n = create_InputStream(data), 0
                while stream.size() > 0:
                    buf._coder_impl.decode_from_stream(stream, True)
                    n += 1
            tracer.writes.append({"buffer": id(buf), "bytes": len(data), "elements": n, "stage": tracer.stage[:160],
                                  "thread": threading.current_thread().name})
            return list_append(buf, data)

        partition = execution.GroupingBuffer.partition

        def partition_traced(buf, n):
            # The join's table, as the runner splits it between the workers: keys and marks
            # (values beyond a key's document) in each part.
            if id(buf) in tracer.join_buffers and buf._grouped_output is None:
                parts = [{"keys": 0, "marks": 0, "values": 0} for _ in range(n)]
                for idx, vs in enumerate(buf._table.values()):
                    part = parts[idx % n]
                    part["keys"] += 1
                    part["values"] += len(vs)
                    part["marks"] += len(vs) - 1
                tracer.partitions.append(parts)
                print(f"join table split {n} ways: {parts}", file=sys.stderr, flush=True)
            return partition(buf, n)

        send = fn_runner.BundleManager._send_input_to_worker

        def send_traced(manager, bundle_id, transform_id, byte_streams):
            if tracer.in_join:
                tracer.sent.append({"bundle": bundle_id, "transform": transform_id[:120],
                                    "worker": id(manager._worker_handler),
                                    "bytes": sum(len(b) for b in (byte_streams or []))})
            return send(manager, bundle_id, transform_id, byte_streams)

        fn_runner.FnApiRunner._execute_bundle = execute_bundle
        execution.GroupingBuffer.partition = partition_traced
        fn_runner.BundleManager._send_input_to_worker = send_traced
        execution.ListBuffer.append = append

    def findings(self) -> list[str]:
        out, seen = [], set()
        runs = collections.Counter(b["stage"] for b in self.bundles)
        out += [f"{n} bundles: {s[:120]}" for s, n in runs.items() if n > 1]
        for b in self.bundles:
            for pc, producers in b["producers"].items():
                out += [f"ran before its producer {p[:80]} (of {pc[:60]}): {b['stage'][:80]}"
                        for p in producers if p not in seen]
            seen.add(b["stage"])
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=502.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", required=True, help="the corpus (built once) and the outputs go here")
    ap.add_argument("--repeat", type=int, default=1, help="runs, stopping at the first that disagrees")
    ap.add_argument("--join-table", action="store_true", help="inspect the documents' join table before it is read")
    args = ap.parse_args(argv)

    import extract as bench  # benchmarks/extract.py

    from mtnlg.config import replace
    from mtnlg.extract.beam_job import extract
    from mtnlg.extract.config import RULES, ExtractConfig

    work = Path(args.dir)
    if not (work / "in").exists():
        bench.neardup_corpus(work / "in", args.mb)
    cfg = replace(ExtractConfig(), [f"filters.disabled={json.dumps(list(RULES))}"])
    reran: list[str] = []
    tracer = Tracer(args.join_table)
    tracer.install()
    rerun_from = []  # where in tracer.bundles extract()'s rerun on 1 worker began

    class Rerun(logging.Handler):
        def emit(self, record):
            if "rerunning on 1 worker" in record.getMessage():
                reran.append(record.getMessage())
                rerun_from.append(len(tracer.bundles))

    logging.getLogger("mtnlg.extract").addHandler(Rerun())
    for run in range(1, args.repeat + 1):
        tracer.bundles, tracer.writes, tracer.partitions, tracer.sent = [], [], [], []
        t = time.perf_counter()
        stats = extract([str(work / "in")], str(work / "out"), cfg, workers=args.workers)
        if rerun_from:  # the findings are those of the run on N workers, not of its rerun
            tracer.bundles = tracer.bundles[:rerun_from[0]]
        found = tracer.findings()
        (work / f"trace-{run}.json").write_text(json.dumps({"bundles": tracer.bundles, "writes": tracer.writes,
                                                            "join_partitions": tracer.partitions, "join_sent": tracer.sent,
                                                            "findings": found, "reran": reran}, indent=1))
        print(f"run {run}: {time.perf_counter() - t:.0f} s, duplicates {stats['duplicates']}, "
              f"{len(tracer.bundles)} bundles; {'; '.join(found) or 'every stage ran once, after its producers'}"
              f"{'; DISAGREED: ' + reran[0] if reran else ''}", flush=True)
        if reran:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
