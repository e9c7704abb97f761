"""The fixed cost of the near-duplicate grouping: the bundled corpus's extract, as ``mtnlg run``
does it, timed for several variants in one run, alternating, best of ``--repeat``.

A variant is ``LABEL=ROOT[,KEY=VALUE...]``: the extract of ``ROOT``'s ``mtnlg`` package (a
source tree: this repository, or a copy of an earlier version of it) with the config
overrides after it, in a fresh process (``PYTHONPATH=ROOT``), on ``--workers`` DirectRunner
workers, with ``validation_fraction=0.05`` as ``mtnlg run`` sets it. Every variant must write
the same train and validation shards, byte for byte, and the same counts; the script fails
otherwise. On a shared machine the best times move with its load: each round runs every
variant once, in turn, and the median over the rounds of each variant's time over the first
variant's is printed beside the best-of ratio. The bundled corpus has no near-duplicate pair,
so the difference between variants is what the grouping costs when there is nothing to group.

    .venv/bin/python benchmarks/extract_grouping.py --variant now=.
    # against an earlier version (a copy of its tree: git archive COMMIT mtnlg | tar -x -C /tmp/old)
    .venv/bin/python benchmarks/extract_grouping.py --variant before=/tmp/old,dedup.components=single \\
        --variant before-distributed=/tmp/old,dedup.components=distributed --variant now=.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "python-docs"

ONE = """
import json, sys, time
from mtnlg.config import replace
from mtnlg.extract.beam_job import extract
from mtnlg.extract.config import ExtractConfig
out, workers, overrides = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
cfg = replace(ExtractConfig(), ["validation_fraction=0.05", *overrides])
t = time.perf_counter()
stats = extract([sys.argv[4]], out, cfg, workers=workers)
print(json.dumps({"seconds": time.perf_counter() - t, "kept": stats["kept"], "duplicates": stats["duplicates"],
                  "dropped": sum(stats["dropped"].values())}))
"""


def parse_variant(text: str) -> tuple[str, Path, list[str]]:
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"--variant {text!r}: expected LABEL=ROOT[,KEY=VALUE...]")
    root, *overrides = rest.split(",")
    root_path = Path(root).resolve()
    if not (root_path / "mtnlg" / "extract" / "beam_job.py").is_file():
        raise SystemExit(f"--variant {text!r}: {root_path} holds no mtnlg/extract/beam_job.py")
    return label, root_path, overrides


def run_variant(root: Path, overrides: list[str], out: Path, workers: int) -> dict:
    """One extract in a fresh process importing ``root``'s mtnlg; its result line as a dict,
    with the wall time of the whole process (``wall``) and the CPU time of it and its worker
    processes (``cpu``: less sensitive than wall time to other jobs on a shared machine)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", ONE, str(out), str(workers), json.dumps(overrides), str(CORPUS)],
                       capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"extract with {root} {overrides} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "wall": wall, "cpu": cpu}


def shards(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/part-*.jsonl"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", required=True, metavar="LABEL=ROOT[,KEY=VALUE...]")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner workers (mtnlg run uses 2)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    ratios: dict[str, list[float]] = {}  # each round's time over the first variant's in that round
    first: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {label: Path(tmp) / label for label, _, _ in variants}
        for rep in range(args.repeat):
            this_round: dict[str, float] = {}
            for label, root, overrides in variants:
                res = run_variant(root, overrides, outputs[label], args.workers)
                this_round[label] = res["seconds"]
                print(f"round {rep + 1} {label}: {res['seconds']:.2f} s in extract(), {res['wall']:.2f} s "
                      f"in all, {res['cpu']:.2f} s CPU (1-min load {os.getloadavg()[0]:.2f})", flush=True)
                best[label] = min(best.get(label, float("inf")), res["seconds"])
                best_cpu[label] = min(best_cpu.get(label, float("inf")), res["cpu"])
                first.setdefault(label, {k: res[k] for k in ("kept", "duplicates", "dropped")})
            for label, secs in this_round.items():
                ratios.setdefault(label, []).append(secs / this_round[variants[0][0]])
        ref_label = variants[0][0]
        ref = shards(outputs[ref_label])
        for label in outputs:
            if first[label] != first[ref_label]:
                raise SystemExit(f"{label} counts {first[label]} differ from {ref_label}'s {first[ref_label]}")
            if shards(outputs[label]) != ref:
                raise SystemExit(f"{label} wrote other shards than {ref_label}")
    base, base_cpu = best[ref_label], best_cpu[ref_label]
    print(f"best of {args.repeat}, {args.workers} worker(s), same shards and counts in every variant:")
    for label in best:
        print(f"  {label}: {best[label]:.2f} s ({best[label] / base:.2f}x {ref_label}; median of the "
              f"rounds' ratios {statistics.median(ratios[label]):.2f}x), {best_cpu[label]:.2f} s CPU "
              f"({best_cpu[label] / base_cpu:.2f}x)")
    print(json.dumps({"best_s": best, "best_cpu_s": best_cpu, "ratios": ratios, "workers": args.workers,
                      "repeat": args.repeat, "counts": first[ref_label]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
