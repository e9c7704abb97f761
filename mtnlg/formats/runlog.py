"""A training run's record: ``log.jsonl`` rows, ``summary.json``, and the loss curve drawn
from the rows. The trainer writes them; the trainer (on resume), the launchers and the
evaluation report read them, all through this module.

``log.jsonl`` holds one JSON object per logged step, at least ``step``, ``loss`` (``null``
when the step's loss was not finite) and ``lr``; also throughput, ``val_loss`` on
validation steps, and the consumed samples (see ``mtnlg.train.metrics``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from mtnlg import storage
from mtnlg.formats.rundir import SUMMARY_FILE
from mtnlg.progress import get_logger

log = get_logger("mtnlg.formats.runlog")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_log(path: str) -> tuple[list[dict[str, Any]], int]:
    """The rows of ``log.jsonl`` that are JSON objects with a numeric ``step``, in file
    order, and the number of other non-blank lines (each skipped with a warning naming
    the file and line)."""
    rows, skipped = [], 0
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not _number(row.get("step")):
                raise TypeError("not an object with a numeric step")
        except (ValueError, TypeError) as e:
            skipped += 1
            log.warning("%s line %d skipped: %s", path, n, e)
            continue
        rows.append(row)
    return rows, skipped


def loss_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose training loss is a finite number."""
    return [r for r in rows if _number(r.get("loss")) and math.isfinite(r["loss"])]


def read_summary(run_dir: str) -> dict[str, Any] | None:
    """``summary.json`` of a run directory, or None when the run has not written one."""
    path = storage.join(run_dir, SUMMARY_FILE)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def plot_loss_curve(rows: list[dict[str, Any]], png_path: str, title: str = "training loss") -> bool:
    """Training loss (and validation loss, and the learning rate on a second axis) against
    step, as a PNG at ``png_path`` (local, gs:// or s3://). False when no row has a finite loss."""
    pts = [(r["step"], r["loss"]) for r in loss_rows(rows)]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", lw=1.5, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in rows if _number(r.get("val_loss"))]
    if val:
        ax.plot([p[0] for p in val], [p[1] for p in val], "o-", color="tab:orange", lw=1.2, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in rows if _number(r.get("lr"))]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in lrs], [p[1] for p in lrs], color="tab:gray", lw=1, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper right")
    else:
        ax.legend(loc="upper right")
    fig.tight_layout()
    with storage.atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True
