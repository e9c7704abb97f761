"""What one ``mtnlg train --nproc N`` launch costs around its training steps, with and
without the interpreter's teardown at exit (``mtnlg.process.exit_process``).

    .venv/bin/python benchmarks/launch.py              # 2 processes, 2 steps, 4 pairs
    .venv/bin/python benchmarks/launch.py --pairs 8 --nproc 4

Each pair runs the same ``mtnlg train`` command (the ``debug`` recipe: a 0.4M-parameter
GPT, TP=2, two steps and a checkpoint, on a tokenized slice of the bundled corpus) twice,
as a user runs it (a new ``mtnlg`` process starting ``torchrun``), in alternating order:

* ``full``: ``MTNLG_FULL_EXIT=1``, every process ends through the interpreter's exit;
* ``fast``: the default, ``exit_process`` in the ``mtnlg`` command and in every training
  process (``torchrun``'s own agent still tears down as it does).

It prints each launch's wall time, the means, the ratio fast/full and the seconds saved per
launch, with the load average before and after (the machine is shared: the ratio is the
figure to quote).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _launch(data: Path, out: Path, nproc: int, full: bool) -> float:
    env = dict(os.environ, MTNLG_FULL_EXIT="1" if full else "0", MTNLG_LOG_LEVEL="WARNING")
    cmd = [sys.executable, "-m", "mtnlg.cli", "train", "--nproc", str(nproc), "--recipe", "debug",
           f"data.path={data}", f"output={out}", "train.steps=2", "model.seq_length=64"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from corpus_data import tokenized_dir, whatsnew_paragraphs  # a real tokenizer: the launcher checks for one

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"full": [], "fast": []}
    with tempfile.TemporaryDirectory(prefix="mtnlg-launch-bench-") as d:
        docs = whatsnew_paragraphs(max_files=6)
        data = tokenized_dir(Path(d), docs[:-30], docs[-30:], vocab_size=512)
        for i in range(args.pairs):
            for mode in (("full", "fast") if i % 2 == 0 else ("fast", "full")):
                out = Path(d) / f"run-{mode}-{i}"
                times[mode].append(_launch(data, out, args.nproc, full=mode == "full"))
                print(f"pair {i + 1}/{args.pairs} {mode}: {times[mode][-1]:.2f} s", flush=True)
    full, fast = statistics.mean(times["full"]), statistics.mean(times["fast"])
    print(f"\nmtnlg train --nproc {args.nproc} (2 steps), mean of {args.pairs}: full exit {full:.2f} s, "
          f"exit_process {fast:.2f} s: ratio {fast / full:.2f}, {full - fast:.2f} s saved per launch")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
