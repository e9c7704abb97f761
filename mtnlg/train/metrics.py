"""What a run reports, written by rank 0: ``log.jsonl``, TensorBoard events, a progress line
per logged step (rate, ETA), and at the end ``summary.json`` and ``loss.png``; inside a Kubeflow
TrainJob that offers it, the progress also goes to the TrainJob's status
(:mod:`mtnlg.train.platform_progress`).

:class:`MetricsProcessor` exists on every rank and does nothing off rank 0, so the loop
calls it unconditionally. Locally the files are written in place; for a ``gs://`` or ``s3://`` run
directory they are written to a local folder and uploaded at every checkpoint and at the
end (:class:`RunFiles`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

from mtnlg import storage
from mtnlg.config import dump_yaml
from mtnlg.formats.rundir import LOG_FILE, LOSS_PLOT, RUN_CONFIG, SUMMARY_FILE, TENSORBOARD_DIR
from mtnlg.formats.runlog import plot_loss_curve, read_log
from mtnlg.progress import fmt_time, get_logger
from mtnlg.train.platform_progress import ProgressReporter, TrainProgress
from mtnlg.train.state import StepResult, TrainState

log = get_logger("mtnlg.train")

# log.jsonl keys that also go to TensorBoard (val_loss as val/loss, the others as train/KEY)
_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "batch_size", "val_loss")


def _read_interval(losses: list, grad_norm) -> tuple[float | None, float | None]:
    """The mean of an interval's finite losses and the last gradient norm (None where not
    finite), read from the device in one go."""
    import torch

    norm = grad_norm.float().reshape(())
    if losses:
        vals = torch.stack([loss.float().reshape(()) for loss, _ in losses])
        ok = torch.stack([finite.reshape(()) for _, finite in losses]).to(vals.device)
        total = torch.where(ok, vals, torch.zeros_like(vals)).sum()
        count = ok.sum().to(vals.dtype)
        packed = torch.stack([total, count, norm.to(vals.device)])
    else:
        packed = torch.stack([torch.zeros(()), torch.zeros(()), norm.cpu()])
    total, count, norm_value = packed.tolist()
    return (total / count if count else None), (norm_value if math.isfinite(norm_value) else None)


def _peak_memory() -> float | None:
    import torch

    return float(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() else None


def plan_report(estimate, measured_step_s: float, peak_bytes: float | None) -> dict[str, Any]:
    """The planner's prediction for the run's layout next to what the run measured (the
    measured step includes validation and checkpoint time; ramp-up steps are smaller)."""
    return {"gpu": estimate.gpu, "predicted_step_s": estimate.time.total, "measured_step_s": measured_step_s,
            "step_ratio": measured_step_s / estimate.time.total,
            "predicted_memory_gb": estimate.memory.total / 1e9,
            "measured_peak_memory_gb": None if peak_bytes is None else peak_bytes / 1e9,
            "predicted_mfu": estimate.mfu}


def throughput(tokens: float, seconds: float, flops_per_token: float, peak_tflops: float | None,
               world_size: int) -> tuple[float, float, float | None]:
    """``(tokens/s, TFLOP/s, MFU)`` of ``tokens`` processed by the whole job in ``seconds``;
    MFU is None when the device's peak is unknown (CPUs)."""
    tps = tokens / seconds if seconds > 0 else 0.0
    tflops = tps * flops_per_token / 1e12
    return tps, tflops, (tflops / (peak_tflops * world_size) if peak_tflops else None)


class RunFiles:
    """Rank 0's run directory: in place when local; for gs:// and s3:// a local folder uploaded by
    :meth:`sync`."""

    def __init__(self, output: str):
        self.output = output
        self.remote = storage.is_remote(output)
        self.local = tempfile.mkdtemp(prefix="mtnlg-run-") if self.remote else output
        os.makedirs(self.local, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.local, name)

    def final(self, name: str) -> str:
        return storage.join(self.output, name)

    def fetch(self, name: str) -> None:
        """Bring an existing remote file (the log of a run being resumed) into the local dir."""
        if self.remote and storage.exists(self.final(name)):
            storage.copy(self.final(name), self.path(name))

    def sync(self) -> None:
        if self.remote:
            storage.copy_tree(self.local, self.output)

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class _Interval:
    """What happened since the last logged step."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.steps = 0
        self.losses: list[float] = []


class MetricsProcessor:
    """Logs steps on cadence (``train.log_every``, the first and last steps, validation and
    stop steps), and writes the summary. A no-op on every rank but rank 0."""

    def __init__(self, cfg, enabled: bool, describe: dict[str, Any]):
        self.cfg = cfg
        self.enabled = enabled
        # parameters, flops_per_token, peak_tflops, world_size, layout, device, dtype
        self.describe = describe
        self.files: RunFiles | None = None
        self.writer = None
        self.rows: list[dict] = []
        self.platform: ProgressReporter | None = None  # Kubeflow Trainer's status endpoint, when given
        self.latest: dict[str, float | None] = {}      # the last logged loss, throughput, validation loss

    # ---------------------------------------------------------------- start / cadence
    def start(self, state: TrainState, summary_line: str) -> None:
        """Open the run files (trimming a resumed run's log to the resumed step)."""
        self.start_step = state.step
        self.start_samples = state.consumed_samples
        self.start_time = time.perf_counter()
        self.interval = _Interval()
        if not self.enabled:
            return
        self.files = RunFiles(self.cfg.output)
        self.rows = self._resumed_rows(state.step)
        if self.rows:  # a resumed run's last logged values, until this run logs its own
            self.latest = {"loss": self.rows[-1].get("loss"), "tokens_per_s": self.rows[-1].get("tokens_per_s")}
        storage.write_text(self.files.path(RUN_CONFIG), dump_yaml(self.cfg))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.files.path(TENSORBOARD_DIR), purge_step=state.step + 1 if state.step else None)
        log.info(summary_line)
        self.platform = ProgressReporter.from_env()
        estimate = self.describe.get("plan")
        if estimate is not None:
            log.info("plan for this layout on %s: %.1f GB per GPU, %.3f s per full-batch step, %.1f%% bubble, "
                     "MFU %.1f%%", estimate.gpu, estimate.memory.total / 1e9, estimate.time.total,
                     100 * estimate.time.bubble_fraction, 100 * estimate.mfu)

    def _resumed_rows(self, step: int) -> list[dict]:
        """Rows of an earlier log up to the resumed step (later rows belong to a lost future)."""
        path = self.files.path(LOG_FILE)
        rows: list[dict] = []
        if step:
            self.files.fetch(LOG_FILE)
            if os.path.exists(path):
                rows = [r for r in read_log(path)[0] if r["step"] <= step]
        storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def should_log(self, step: int, last_step: bool, extra: bool) -> bool:
        return (step % self.cfg.train.log_every == 0 or step == self.start_step + 1 or last_step or extra)

    # ---------------------------------------------------------------- per step
    def record(self, state: TrainState, r: StepResult, val_loss: float | None, last_step: bool) -> None:
        """Account for one step; log it when its turn comes."""
        self.interval.tokens += r.batch_size * self.cfg.model.seq_length
        self.interval.steps += 1
        if self.enabled:
            self.interval.losses.append((r.loss, r.finite))  # device tensors, read when logged
        row = None
        if self.enabled and self.should_log(state.step, last_step, val_loss is not None or r.stop):
            row = self._row(state, r, val_loss)
            self.rows.append(row)
            self._write(row)
            self.interval = _Interval()
        if self.platform is not None:
            self._offer_progress(state, row)

    def _offer_progress(self, state: TrainState, row: dict | None) -> None:
        """Hand the platform reporter this step's progress (host values only: the loss and
        throughput are those of the last logged step; its ETA where this step was logged)."""
        if row is not None:
            self.latest.update(loss=row["loss"], tokens_per_s=row["tokens_per_s"])
            if "val_loss" in row:
                self.latest["val_loss"] = row["val_loss"]
            eta = row["eta_s"]
        else:
            done = state.step - self.start_step
            eta = (time.perf_counter() - self.start_time) / done * (self.cfg.train.steps - state.step) if done else None
        self.platform.offer(self._progress(state, eta))

    def _progress(self, state: TrainState, eta: float | None) -> TrainProgress:
        metrics = {**self.latest, "step": state.step, "total_steps": self.cfg.train.steps}
        return TrainProgress(state.step, self.cfg.train.steps, eta, metrics)

    def _row(self, state: TrainState, r: StepResult, val: float | None) -> dict:
        now = time.perf_counter()
        iv = self.interval
        dt = max(now - iv.t0, 1e-9)
        d = self.describe
        tps, tflops, mfu = throughput(iv.tokens, dt, d["flops_per_token"], d["peak_tflops"], d["world_size"])
        done = state.step - self.start_step
        eta = (now - self.start_time) / done * (self.cfg.train.steps - state.step) if done else None
        loss, grad_norm = _read_interval(iv.losses, r.grad_norm)
        row = {
            "step": state.step,
            "loss": loss,
            "lr": r.lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tps,
            "tflops": tflops,
            "mfu": mfu,
            "batch_size": r.batch_size,
            "consumed_samples": state.consumed_samples,
            "consumed_tokens": state.consumed_samples * self.cfg.model.seq_length,
            "skipped_steps": state.skipped_steps,
            "step_time_s": dt / max(iv.steps, 1),
            "elapsed_s": now - self.start_time,
            "eta_s": eta,
        }
        if val is not None:
            row["val_loss"] = val
        return row

    def _write(self, row: dict) -> None:
        with open(self.files.path(LOG_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for key in _SCALARS:
            if row.get(key) is not None:
                self.writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", row[key], row["step"])
        steps = self.cfg.train.steps
        parts = [f"step {row['step']}/{steps} ({100.0 * row['step'] / steps:.0f}%)",
                 f"loss {row['loss']:.4f}" if row["loss"] is not None else "loss nan",
                 f"lr {row['lr']:.3g}",
                 f"grad norm {row['grad_norm']:.3f}" if row["grad_norm"] is not None else "grad norm nan",
                 f"{row['tokens_per_s']:,.0f} tok/s", f"{row['tflops']:.3f} TFLOP/s"]
        if row["mfu"] is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if "val_loss" in row:
            parts.append(f"val loss {row['val_loss']:.4f}")
        parts.append(f"ETA {fmt_time(row['eta_s'])}" if row["eta_s"] is not None else "ETA ?")
        log.info(" | ".join(parts))

    def close(self) -> None:
        """Stop reporting to the platform without a final report (a run that failed);
        nothing once :meth:`finish` has run."""
        if self.platform is not None:
            self.platform.stop()

    def sync(self) -> None:
        """Upload the run files (a gs:// or s3:// run directory), e.g. after a checkpoint."""
        if self.enabled:
            self.files.sync()

    # ---------------------------------------------------------------- the end
    def finish(self, state: TrainState, checkpoint: str | None, stopped: str, val_loss: float | None,
               resumed_from: str | None, error: str | None = None) -> dict | None:
        """Write ``summary.json`` and ``loss.png``, close the files; the summary (None off rank 0)."""
        if not self.enabled:
            return None
        wall = time.perf_counter() - self.start_time
        seq = self.cfg.model.seq_length
        d = self.describe
        tps, tflops, mfu = throughput((state.consumed_samples - self.start_samples) * seq, wall,
                                      d["flops_per_token"], d["peak_tflops"], d["world_size"])
        losses = [r["loss"] for r in self.rows if r.get("loss") is not None]
        if val_loss is None:  # a rerun that found the run finished: the loss logged at its last step
            at_end = [r["val_loss"] for r in self.rows if r.get("step") == state.step and r.get("val_loss") is not None]
            val_loss = at_end[-1] if at_end else None
        f = self.files
        summary = {
            "steps": state.step,
            "steps_this_run": state.step - self.start_step,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "val_loss": val_loss,
            "checkpoint": checkpoint,
            "log": f.final(LOG_FILE),
            "tensorboard": f.final(TENSORBOARD_DIR),
            "loss_curve": f.final(LOSS_PLOT),
            "config": f.final(RUN_CONFIG),
            "output": self.cfg.output,
            "stopped": stopped,
            "error": error,
            "resumed_from": resumed_from,
            "consumed_samples": state.consumed_samples,
            "consumed_tokens": state.consumed_samples * seq,
            "skipped_steps": state.skipped_steps,
            "parameters": d["parameters"],
            "flops_per_token": d["flops_per_token"],
            "tokens_per_s": tps,
            "tflops": tflops,
            "mfu": mfu,
            "wall_s": wall,
            "world_size": d["world_size"],
            "layout": d["layout"],
            "device": d["device"],
            "dtype": d["dtype"],
        }
        if d.get("plan") is not None:
            summary["plan"] = plan_report(d["plan"], wall / max(state.step - self.start_step, 1), _peak_memory())
            p = summary["plan"]
            log.info("measured %.3f s per step vs %.3f s predicted (x%.2f); peak memory %s GB vs %.1f GB predicted",
                     p["measured_step_s"], p["predicted_step_s"], p["step_ratio"],
                     "?" if p["measured_peak_memory_gb"] is None else f"{p['measured_peak_memory_gb']:.1f}",
                     p["predicted_memory_gb"])
        self.writer.flush()
        self.writer.close()
        try:
            plot_loss_curve(self.rows, f.path(LOSS_PLOT))
        except Exception as e:  # noqa: BLE001 - a missing plot must not fail a finished run
            log.warning("could not draw %s: %s", LOSS_PLOT, e)
        storage.write_text(f.path(SUMMARY_FILE), json.dumps(summary, indent=2))
        f.sync()
        f.close()
        if self.platform is not None:  # the final state, whatever the interval: 100% when completed
            if val_loss is not None:
                self.latest["val_loss"] = val_loss
            self.platform.close(self._progress(state, 0.0 if stopped == "completed" else None))
        if error is None:
            log.info("%s at step %d: final loss %s, checkpoint %s", stopped, state.step, summary["final_loss"],
                     checkpoint)
        return summary
