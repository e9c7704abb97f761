"""SIGKILL at random moments during extract, tokenize, fuse and a checkpoint save, each run
as a user runs it (``mtnlg STEP ...``, its own process group); then a rerun. While the step
runs its output directory is listed every few milliseconds, and every file that shows up
under a final name is read at once: it must already be the file an uninterrupted run
writes (so no partial file is ever visible under a final name). After the rerun the
outputs equal the uninterrupted run's, byte for byte (wall-clock figures aside), with no
staging leftovers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from outputs import comparable, ignored, snapshot

pytestmark = pytest.mark.e2e

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "python-docs"
MTNLG = [sys.executable, "-m", "mtnlg.cli"]
TRAIN = ["train", "--nproc", "2", "--recipe", "debug", "train.log_every=1", "train.eval_every=3", "train.eval_iters=1",
         "schedule.warmup_steps=1", "schedule.decay_steps=6", "checkpoint.every=1", "checkpoint.keep_last=2",
         "model.seq_length=64"]


def _staging(rel: str) -> bool:
    """A name the steps write into before moving it to its final name."""
    return any(p.endswith((".tmp", ".partial")) or p.startswith(".tokenize-") for p in rel.split("/"))


def _files(root: Path) -> dict[str, Path]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            full = Path(dirpath) / n
            out[str(full.relative_to(root))] = full
    return out


class Watch:
    """Runs ``cmd``; lists ``root`` while it runs; reads each final-named file as soon as it
    appears (or changes) and records any that differ from ``reference``."""

    def __init__(self, cmd: list[str], root: Path, reference: dict[str, bytes], cwd: Path, watched=None):
        self.cmd, self.root, self.reference, self.cwd = cmd, root, reference, cwd
        self.watched = watched or (lambda rel: True)
        self.bad: list[str] = []
        self.checked: set[tuple] = set()

    def _look(self) -> None:
        if not self.root.exists():
            return
        for rel, full in _files(self.root).items():
            if _staging(rel) or ignored(rel) or rel not in self.reference or not self.watched(rel):
                continue  # not a final name, or not one whose content is final when it appears
            try:
                st = full.stat()
                key = (rel, st.st_ino, st.st_size, st.st_mtime_ns)
                if key in self.checked:
                    continue
                data = full.read_bytes()
            except FileNotFoundError:
                continue  # replaced meanwhile
            self.checked.add(key)
            try:
                same = comparable(rel, data) == self.reference[rel]
            except ValueError:  # a JSON file that does not parse: partial
                same = False
            if not same:
                self.bad.append(f"{rel} ({len(data)} bytes)")

    def run(self, kill_when=None, delay: float = 0.0, timeout: float = 180) -> int | None:
        """Run to the end, or SIGKILL the process group ``delay`` seconds after
        ``kill_when(root)`` first holds; returns the exit code (None: killed)."""
        proc = subprocess.Popen(self.cmd, cwd=self.cwd, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline, fire = time.monotonic() + timeout, None
        try:
            while proc.poll() is None:
                self._look()
                now = time.monotonic()
                if kill_when is not None and fire is None and kill_when(self.root):
                    fire = now + delay
                if fire is not None and now >= fire:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return None
                assert now < deadline, f"{self.cmd} did not finish in {timeout} s"
                time.sleep(0.005)
            self._look()
            err = proc.stderr.read()
            assert proc.returncode == 0 or kill_when is not None, err[-3000:]
            if kill_when is not None and proc.returncode == 0:
                return 0  # finished before the moment came
            assert proc.returncode == 0, err[-3000:]
            return 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _check_step(tmp: Path, cmd: list[str], out: Path, moments, seed: int, watched=None, resumed=None) -> None:
    """The uninterrupted run, then kills at ``moments`` (``(condition, max_delay)`` pairs),
    then a rerun; ``out`` is the step's output (a directory). ``watched``: which final names
    must be complete when they appear (default: all); ``resumed(got)``: the rerun's outputs
    with what a resumed run rightly reports differently (the checkpoint it resumed from)
    taken out."""
    t = time.monotonic()
    Watch(cmd, out, {}, tmp).run()
    whole = time.monotonic() - t
    reference = snapshot(str(out))
    assert reference
    shutil.rmtree(out)
    rng = random.Random(seed)
    killed = 0
    for when, max_delay in moments:
        w = Watch(cmd, out, reference, tmp, watched)
        # a (lo, hi) pair: fractions of the uninterrupted run's wall time, which follows the machine's speed
        delay = rng.uniform(max_delay[0] * whole, max_delay[1] * whole) if isinstance(max_delay, tuple) \
            else rng.uniform(0, max_delay)
        if w.run(kill_when=when, delay=delay) is None:
            killed += 1
        assert w.bad == [], f"partial or wrong files under final names: {w.bad}"
    assert killed >= 1
    w = Watch(cmd, out, reference, tmp, watched)
    assert w.run() == 0
    assert w.bad == []
    got = snapshot(str(out))
    if resumed is not None:
        got = resumed(got)
    assert sorted(got) == sorted(reference)
    assert [n for n in reference if got[n] != reference[n]] == [], {n: (reference[n][:2000], got[n][:2000]) for n in reference if got[n] != reference[n]}
    assert not [n for n in _files(out) if _staging(n)], "staging leftovers"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name) and p.name != out.name]


def _unresumed(got: dict[str, bytes]) -> dict[str, bytes]:
    summary = json.loads(got["summary.json"])
    assert summary["resumed_from"] and "/checkpoints/step_" in summary["resumed_from"]
    summary["resumed_from"] = None  # what the rerun rightly reports of itself
    summary["steps_this_run"] = 6
    return {**got, "summary.json": json.dumps(summary, sort_keys=True).encode()}


def _any_file(pattern: str):
    return lambda root: root.exists() and any(Path(p).match(pattern) for p in _files(root))


def _always(root: Path) -> bool:
    return True


def _started(root: Path) -> bool:
    return root.exists() or root.with_name(root.name + ".partial").exists()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    """A little extracted corpus (what tokenize reads)."""
    from corpus_data import whatsnew_paragraphs, write_extracted

    root = tmp_path_factory.mktemp("extracted")
    docs = whatsnew_paragraphs(max_files=8)
    write_extracted(root, docs[:-40], docs[-40:])
    return root


def test_extract_killed_while_it_writes(tmp_path):
    shutil.copytree(CORPUS / "faq", tmp_path / "corpus")
    out = tmp_path / "out"
    cmd = MTNLG + ["extract", str(tmp_path / "corpus"), "--output", str(out), "--workers", "1", "num_shards=4",
                   "validation_fraction=0.2"]
    _check_step(tmp_path, cmd, out, [(_any_file("train/*"), 0.05), (_started, 4.0)], seed=1)


def test_tokenize_killed_while_it_writes(tmp_path, extracted):
    out = tmp_path / "tokens"
    cmd = MTNLG + ["tokenize", str(extracted), "--output", str(out), "--vocab-size", "512", "--workers", "1"]
    # the last moment is from the start, late in the run, so that one kill lands however fast the machine
    _check_step(tmp_path, cmd, out, [(_any_file("*.bin"), 0.01), (_started, 0.5), (_always, (0.6, 0.9))], seed=2)


def test_fuse_and_checkpoint_save_killed_while_they_write(tmp_path, extracted):
    tokens = tmp_path / "tokens"
    subprocess.run(MTNLG + ["tokenize", str(extracted), "--output", str(tokens), "--vocab-size", "512",
                            "--workers", "1"], check=True, capture_output=True)
    run = tmp_path / "run"
    train = MTNLG + TRAIN + [f"data.path={tokens}", f"output={run}", "train.steps=6"]
    # a kill at a random moment while step 3's checkpoint is being written (the rerun resumes
    # from step 2 and saves 3 again); the log grows and `latest` moves while training runs: the checkpoints must be whole
    _check_step(tmp_path, train, run, [(_any_file("checkpoints/step_00000003.tmp/*"), 0.3)], seed=3,
                watched=lambda rel: rel.startswith("checkpoints/step_"), resumed=_unresumed)
    model = tmp_path / "model"
    fuse = MTNLG + ["fuse", str(run), "--output", str(model), "--no-hf"]
    _check_step(tmp_path, fuse, model, [(_started, 0.05)], seed=4)
