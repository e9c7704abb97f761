"""A full disk (EFBIG under a file-size limit, as ENOSPC would stop a write) during tokenize,
a checkpoint save and fuse: the step fails with an error naming the cause, and the outputs of
the previous, complete run are intact (byte for byte) with nothing partial under a final name."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from corpus_data import whatsnew_paragraphs, write_extracted

pytestmark = pytest.mark.e2e

LIMIT = 256 << 10  # bytes any one file may grow to in the limited run


def _limited():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def mtnlg(*args: str, limited: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTNLG_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "mtnlg.cli", *args], capture_output=True, text=True, env=env,
                          preexec_fn=_limited if limited else None, timeout=600)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    docs = whatsnew_paragraphs(max_files=6)
    cut = len(docs) * 9 // 10
    return write_extracted(tmp_path_factory.mktemp("disk") / "extracted", docs[:cut], docs[cut:])


@pytest.fixture(scope="module")
def tokenized(extracted, tmp_path_factory) -> Path:
    """A complete tokenize run (which the full-disk rerun must leave as it is)."""
    out = tmp_path_factory.mktemp("disk") / "tokens"
    ok = mtnlg("tokenize", str(extracted), "--output", str(out), "--vocab-size", "600")
    assert ok.returncode == 0, ok.stderr[-2000:]
    return out


def _assert_failed_cleanly(proc, before: dict, root: Path):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "File too large" in out or "file-size limit" in out, out[-3000:]
    after = {k: v for k, v in snapshot(root).items() if not any(part.endswith(".tmp") for part in k.split("/"))}
    assert after == before                       # the previous outputs, byte for byte
    assert not [p for p in root.rglob("*") if p.name.endswith((".partial",))]


def test_tokenize_on_a_full_disk(extracted, tokenized):
    out = tokenized
    before = snapshot(out)
    assert os.path.getsize(out / "train.bin") > LIMIT  # the limited run cannot write it
    proc = mtnlg("tokenize", str(extracted), "--output", str(out), "--vocab-size", "700", limited=True)
    _assert_failed_cleanly(proc, before, out)


def test_checkpoint_save_and_fuse_on_a_full_disk(tokenized, tmp_path):
    tok = tokenized  # intact whether or not the tokenize test ran first (it checks so)
    run = tmp_path / "run"
    common = ["train", "--nproc", "1", "--recipe", "debug", f"data.path={tok}", f"output={run}",
              "parallel.tp=1", "train.eval_iters=0", "checkpoint.every=2", "model.hidden_size=128"]
    ok = mtnlg(*common, "train.steps=2")
    assert ok.returncode == 0, ok.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert max(p.stat().st_size for p in ckpts.rglob("*.distcp")) > LIMIT
    before = snapshot(ckpts)
    proc = mtnlg(*common, "train.steps=4", limited=True)     # resumes at 2, fails saving step 4
    _assert_failed_cleanly(proc, before, ckpts)
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert mtnlg("verify", str(run)).returncode == 0          # what a resume would use is intact

    model = tmp_path / "model"
    assert mtnlg("fuse", str(run), "--output", str(model)).returncode == 0
    before = snapshot(model)
    proc = mtnlg("fuse", str(run), "--output", str(model), "--dtype", "bf16", limited=True)
    _assert_failed_cleanly(proc, before, model)
