"""The trainer through its real entry points, on CPU/gloo with the "debug" recipe.

``mtnlg train --nproc N`` (torchrun, a few seconds per launch, so each test makes the
most of its launches) for exact resume (local and gs://; on s3:// it is
tests/test_pipeline_faults.py, behind a failing proxy) and background checkpoint saves,
layout agreement, falling loss and the safe path, and SIGTERM; the per-process entry point
in this process for NaN/inf handling. Data: a 512-piece SentencePiece tokenization of the bundled
Python "What's new" documents, built once per module by ``mtnlg.tokenize.tokenize``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from corpus_data import tokenized_dir, whatsnew_paragraphs

from mtnlg import storage
from mtnlg.cli import main as mtnlg_main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> str:
    """Extract-format JSONL from the corpus (paragraphs as documents), then tokenize."""
    docs = whatsnew_paragraphs()
    assert len(docs) > 1000
    cut = len(docs) * 95 // 100
    return tokenized_dir(tmp_path_factory.mktemp("data"), docs[:cut], docs[cut:])


def _train(*args: str) -> int:
    """``mtnlg train ARGS`` in this process (with --nproc it starts torchrun)."""
    return mtnlg_main(["train", *args])


def _summary(output: str) -> dict:
    return json.loads(storage.read_text(storage.join(output, "summary.json")))


def _log(output: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(output, "log.jsonl")).splitlines() if line]


# Dropout on, so that exact resume also needs the RNG states; schedule fixed independently
# of train.steps, so runs of different lengths share it.
RESUME = ["--recipe", "debug", "train.log_every=1", "schedule.decay_steps=20", "model.dropout=0.1",
          "model.attention_dropout=0.1", "train.eval_iters=1"]


def _same_checkpoint(a: str, b: str) -> None:
    """Every model and optimizer tensor of checkpoint ``a`` equals ``b``'s, bit for bit."""
    from mtnlg.formats.dcp_reader import CheckpointReader

    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        ea, eb = ra.entries(), rb.entries()
        assert set(ea) == set(eb) and len(ea) > 50
        for k in ea:
            if k.startswith(("model.", "optim.state.")):
                assert torch.equal(ra.read(k), rb.read(k)), (a, b, k)


def test_stop_and_resume_is_bitwise_exact_locally_and_on_gcs_and_background_saves_equal_synchronous_ones(
        tokenized, tmp_path, gcs):
    """An uninterrupted local run saving in the background (checkpoint.async_save: step 3's
    state is copied to host memory and written while steps 4-6 train), and a run on gs://
    stopped at step 3 (a synchronous save) then resumed to step 6: the same losses, bit for
    bit, and the same checkpoints at steps 3 and 6."""
    a = str(tmp_path / "uninterrupted")
    assert _train("--nproc", "2", *RESUME, f"data.path={tokenized}", f"output={a}", "train.steps=6",
                  "checkpoint.every=3", "checkpoint.keep_last=2", "checkpoint.async_save=true") == 0
    b = f"{gcs}/resumed"
    assert _train("--nproc", "2", *RESUME, f"data.path={tokenized}", f"output={b}", "train.steps=3",
                  "checkpoint.keep_last=1") == 0
    assert _summary(b)["steps"] == 3
    _same_checkpoint(f"{a}/checkpoints/step_00000003", f"{b}/checkpoints/step_00000003")
    assert _train("--nproc", "2", *RESUME, f"data.path={tokenized}", f"output={b}", "train.steps=6",
                  "checkpoint.keep_last=1") == 0

    full, resumed = _log(a), _log(b)
    assert [r["step"] for r in full] == [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    # tp=2 on CPU fp32: the continuation equals the uninterrupted run bit for bit.
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full]
    assert _summary(b)["val_loss"] == _summary(a)["val_loss"]
    s = _summary(b)
    assert s["resumed_from"] == f"{b}/checkpoints/step_00000003"
    assert s["checkpoint"] == f"{b}/checkpoints/step_00000006" and s["first_loss"] == full[0]["loss"]
    _same_checkpoint(f"{a}/checkpoints/step_00000006", f"{b}/checkpoints/step_00000006")
    # keep_last=1 pruned step 3 on gs:// after step 6 was complete; latest points at the newest
    ckpts = f"{b}/checkpoints/"
    assert {f[len(ckpts):].split("/")[0] for f in storage.list_files(ckpts)} == {"latest", "step_00000006"}
    assert storage.read_text(f"{b}/checkpoints/latest").strip() == "step_00000006"
    assert sorted(os.listdir(os.path.join(a, "checkpoints"))) == ["latest", "step_00000003", "step_00000006"]
    assert open(os.path.join(a, "checkpoints", "latest")).read().strip() == "step_00000006"
    ckpt_files = {f.rsplit("/", 1)[-1] for f in storage.list_files(f"{b}/checkpoints/step_00000006")}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rank_00000.pt", "rank_00001.pt", "trainer_state.json",
            "config.yaml", "tokenizer.model", "tokenizer.json"} <= ckpt_files
    run_files = storage.list_files(b)
    assert any("/tensorboard/events.out.tfevents" in f for f in run_files)
    assert f"{b}/loss.png" in run_files and f"{b}/config.yaml" in run_files


def test_layouts_agree_and_the_loss_falls(tokenized, tmp_path, monkeypatch):
    # Started where a folder named mtnlg (a clone, say) is in the current directory: it must
    # not shadow the installed package in the training processes (Python's safe-path mode).
    fake = tmp_path / "cwd" / "mtnlg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the shadowing folder was imported')\n")
    monkeypatch.chdir(tmp_path / "cwd")
    common = ["--recipe", "debug", f"data.path={tokenized}", "train.log_every=1", "train.eval_iters=2",
              "schedule.decay_steps=30"]
    runs = {  # the one-process reference runs here, through the per-process entry point
        "tp1": ([], ["parallel.tp=1", "train.steps=3"]),
        "dp2": (["--nproc", "2"], ["parallel.tp=1", "train.steps=3"]),
        "tp2": (["--nproc", "2"], ["parallel.tp=2", "train.steps=30", "train.eval_every=15"]),
    }
    logs = {}
    for name, (launch, args) in runs.items():
        out = str(tmp_path / name)
        assert _train(*launch, *common, *args, f"output={out}") == 0, name
        logs[name] = _log(out)
    ref = [r["loss"] for r in logs["tp1"]]
    for name in ("dp2", "tp2"):
        got = [r["loss"] for r in logs[name][:3]]
        assert got == pytest.approx(ref, abs=2e-4), name   # fp32 reduction order differs
    tp2 = logs["tp2"]
    assert set(tp2[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu"}
    first, last5 = tp2[0]["loss"], sum(r["loss"] for r in tp2[-5:]) / 5
    assert first == pytest.approx(6.24, abs=0.3)   # ~ln(512): the untrained model guesses uniformly
    assert last5 < first - 1.0, (first, last5)
    vals = [r["val_loss"] for r in tp2 if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] < first
    s = _summary(str(tmp_path / "tp2"))
    assert s["steps"] == 30 and s["final_loss"] == tp2[-1]["loss"] and s["mfu"] is None and s["tflops"] > 0
    assert os.path.getsize(tmp_path / "tp2" / "loss.png") > 1000


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tokenized, tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "mtnlg.cli", "train", "--nproc", "2", "--recipe", "debug",
                             f"data.path={tokenized}", f"output={out}", "train.steps=100000", "train.log_every=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(os.path.join(out, "log.jsonl")) and len(_log(out)) >= 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # what Kubernetes does when it deletes the pod
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    s = _summary(out)
    assert s["stopped"] == "signal" and 2 <= s["steps"] < 100000
    name = f"step_{s['steps']:08d}"
    assert s["checkpoint"] == os.path.join(out, "checkpoints", name)
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == name
    state = json.load(open(os.path.join(out, "checkpoints", name, "trainer_state.json")))
    assert state["step"] == s["steps"] and state["consumed_samples"] == 8 * s["steps"]


# ----------------------------------------------------------------------------- NaN / inf


IN_PROCESS = ["--recipe", "debug", "parallel.tp=1", "train.log_every=1", "train.eval_iters=0",
              "schedule.decay_steps=20"]


def test_non_finite_loss_skips_the_update(tokenized, tmp_path, monkeypatch):
    import mtnlg.train.engine as loss_mod  # where the loss is called

    real = loss_mod.cross_entropy
    calls = {"n": 0}

    def flaky(logits, targets, **kw):
        calls["n"] += 1
        loss = real(logits, targets, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss   # step 2's first micro-batch

    updates = {"n": 0}
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **kw):  # counts the steps that changed the weights
        p = self.param_groups[0]["params"][0]
        before = p.detach().clone()
        out = real_step(self, *a, **kw)
        updates["n"] += int(not torch.equal(before, p.detach()))
        return out

    monkeypatch.setattr(loss_mod, "cross_entropy", flaky)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    out = str(tmp_path / "run")
    assert _train(*IN_PROCESS, f"data.path={tokenized}", f"output={out}", "train.steps=4") == 0
    rows = _log(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] is None and rows[1]["skipped_steps"] == 1 and rows[1]["grad_norm"] is None
    assert all(r["loss"] is not None for r in rows[2:])
    assert updates["n"] == 3                      # no update in the skipped step (skipped in the kernel)
    s = _summary(out)
    assert s["skipped_steps"] == 1 and s["stopped"] == "completed" and s["consumed_samples"] == 32


def test_diverging_run_aborts_with_a_clear_message(tokenized, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = _train(*IN_PROCESS, f"data.path={tokenized}", f"output={out}", "train.steps=50", "optim.lr=1e30",
                "optim.grad_clip=0", "schedule.warmup_steps=0", "schedule.decay=constant", "train.max_nan_steps=3")
    assert rc == 3
    err = capsys.readouterr().err
    assert "training diverged: loss was NaN/inf for 3 steps in a row" in err and "train.max_nan_steps=3" in err
    s = _summary(out)
    assert s["stopped"] == "diverged" and s["skipped_steps"] == 3 and s["steps"] < 50
    assert "Lower optim.lr" in s["error"]


def test_a_wrong_data_path_is_one_message_before_any_process_starts(tmp_path, capsys, monkeypatch):
    """The launching process checks the data, its tokenizer, the output and the checkpoint
    to resume from, and names every problem at once; torchrun is never started."""
    from mtnlg.train import launch

    started = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: started.append(a))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    rc = _train("--nproc", "2", "--recipe", "debug", f"data.path={tmp_path / 'nowhere'}",
                f"output={tmp_path / 'ro' / 'run'}", f"checkpoint.load={tmp_path / 'no-ckpt'}")
    err = capsys.readouterr().err
    assert rc != 0 and started == []
    assert "cannot start training" in err
    assert f"training data {tmp_path / 'nowhere' / 'train'}.bin" in err
    assert "tokenizer file" in err and "checkpoint.load=" in err
    if os.geteuid() != 0:  # root writes anywhere
        assert "is not writable" in err
