"""Soak: the whole pipeline, back to back, on object storage that keeps failing.

Starts a GCS emulator (``gcp-storage-emulator``) on 127.0.0.1 behind the tests' fault-injecting
proxy (``tests/fault_proxy.py``: 429, 500, 503, resets before and after the store acted, answers
cut in half, slow answers), copies the bundled corpus to ``gs://soak/corpus``, and then runs
extract, tokenize, train, fuse and evaluate ``--runs`` times into ``gs://soak/out`` (cleared
between runs), each step as a user runs it (``python -m mtnlg.cli STEP ...``, a process of its
own, training on ``--nproc`` processes with the ``local`` recipe). Reports, per run and step:
exit status, wall time, peak resident memory (the largest process of the step, from
``wait4``), and for the run as a whole the faults injected and whether every output file is
byte for byte the first run's (wall-clock figures aside). Exits 1 on any failure or
difference.

    python benchmarks/soak.py                         # 5 runs, 15% of requests failing
    python benchmarks/soak.py --runs 2 --train train.steps=40 --fault-rate 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fault_proxy import FAULTS, FaultProxy  # noqa: E402
from outputs import snapshot  # noqa: E402

CORPUS = ROOT / "data" / "corpus" / "python-docs"
BUCKET = "soak"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(root: str, args) -> list[tuple[str, list[str]]]:
    j = lambda *p: "/".join([root, "out", *p])  # noqa: E731
    return [
        ("extract", ["extract", f"{root}/corpus", "--output", j("extracted"), "--workers", "1"]),
        ("tokenize", ["tokenize", j("extracted"), "--output", j("tokens"), "--vocab-size", "4096", "--workers", "1"]),
        ("train", ["train", "--nproc", str(args.nproc), "--recipe", "local", f"data.path={j('tokens')}",
                   f"output={j('run')}", *args.train]),
        ("fuse", ["fuse", j("run"), "--output", j("model")]),
        ("evaluate", ["evaluate", j("model"), "--data", j("tokens"), "--output", j("eval"), "--train-log",
                      j("run", "log.jsonl"), *args.evaluate]),
    ]


# A small process that forks the step and reports its peak RSS (wait4's ru_maxrss: the
# largest of the step's processes). Forking the step from this driver instead would count
# the driver's own memory (the in-memory GCS emulator holds every object) in the child's
# peak, since a forked child starts with its parent's pages resident.
_MEASURE = ("import os, sys\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.execv(sys.argv[1], sys.argv[1:])\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "open(os.environ['MTNLG_SOAK_RSS_FILE'], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def _run_step(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """``(exit status, seconds, peak RSS in MiB)`` of ``python -m mtnlg.cli CMD``."""
    rss_file = log.with_suffix(".rss")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run([sys.executable, "-S", "-c", _MEASURE, sys.executable, "-m", "mtnlg.cli", *cmd],
                            env={**env, "MTNLG_SOAK_RSS_FILE": str(rss_file)}, stdout=out,
                            stderr=subprocess.STDOUT, cwd=str(ROOT)).returncode
    rss = int(rss_file.read_text()) / 1024 if rss_file.exists() else float("nan")
    return rc, time.perf_counter() - t0, rss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fault-rate", type=float, default=0.15, help="share of requests that fail")
    ap.add_argument("--slow-rate", type=float, default=0.05, help="share of answers held back 50-300 ms")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the local recipe (repeatable), e.g. train.steps=40")
    ap.add_argument("--evaluate", action="append", default=[], metavar="FLAG",
                    help="extra flag for mtnlg evaluate (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logs", default="soak-logs", help="directory for each step's output")
    args = ap.parse_args(argv)

    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    failures, different, rows = 0, 0, []
    first = None
    try:
        with FaultProxy(f"http://127.0.0.1:{port}", "gcs", fault_rate=0.0, slow_rate=0.0, seed=args.seed) as proxy:
            os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
            from mtnlg import storage

            storage.clear_client_cache()
            root = f"gs://{BUCKET}"
            for f in sorted(CORPUS.rglob("*")):
                if f.is_file():
                    storage.copy(str(f), f"{root}/corpus/{f.relative_to(CORPUS)}")
            env = {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url, "MTNLG_LOG_LEVEL": "WARNING"}
            print(f"soak: {args.runs} runs of the pipeline on gs:// behind a proxy failing {args.fault_rate:.0%} "
                  f"of requests (load average {os.getloadavg()[0]:.2f})", flush=True)
            for run in range(1, args.runs + 1):
                proxy.fault_rate, proxy.slow_rate = 0.0, 0.0
                storage.remove(f"{root}/out")
                proxy.fault_rate, proxy.slow_rate = args.fault_rate, args.slow_rate
                before = dict(proxy.stats)
                t_run = time.perf_counter()
                ok = True
                for name, cmd in _steps(root, args):
                    rc, secs, rss = _run_step(cmd, env, logs / f"run{run}-{name}.log")
                    rows.append({"run": run, "step": name, "rc": rc, "seconds": round(secs, 1),
                                 "peak_rss_mib": round(rss)})
                    print(f"  run {run} {name:<9} rc={rc} {secs:7.1f} s  peak RSS {rss:7.0f} MiB", flush=True)
                    if rc != 0:
                        ok = False
                        print(f"    failed: see {logs / f'run{run}-{name}.log'}", flush=True)
                        break
                proxy.fault_rate, proxy.slow_rate = 0.0, 0.0
                injected = {k: proxy.stats[k] - before.get(k, 0) for k in (*FAULTS, "slow", "requests")}
                if not ok:
                    failures += 1
                    same = None
                else:
                    outputs = snapshot(f"{root}/out")
                    if first is None:
                        first = outputs
                    diff = sorted(set(first) ^ set(outputs)) + [n for n in first if n in outputs
                                                                 and outputs[n] != first[n]]
                    same = not diff
                    if diff:
                        different += 1
                        print(f"    differs from run 1: {diff[:10]}", flush=True)
                faults = sum(injected[k] for k in FAULTS)
                print(f"  run {run}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t_run:.0f} s; "
                      f"{faults} of {injected['requests']} requests failed "
                      f"({', '.join(f'{k} {injected[k]}' for k in FAULTS)}), {injected['slow']} slow; "
                      f"outputs {'identical to run 1' if same else 'DIFFERENT' if same is False else '-'}",
                      flush=True)
    finally:
        server.stop()
    peak = {}
    for r in rows:
        peak[r["step"]] = max(peak.get(r["step"], 0), r["peak_rss_mib"])
    print(json.dumps({"runs": args.runs, "failures": failures, "runs_differing": different,
                      "peak_rss_mib": peak, "load_average": round(os.getloadavg()[0], 2)}))
    return 1 if failures or different else 0


if __name__ == "__main__":
    sys.exit(main())
