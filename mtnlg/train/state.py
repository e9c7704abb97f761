"""The small stateful pieces of a training run: its progress, one step's result, the SIGTERM
flag and the non-finite-loss guard."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from mtnlg.progress import get_logger

log = get_logger("mtnlg.train")


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf for ``train.max_nan_steps`` steps in a row."""


@dataclass
class TrainState:
    """How far the run has come: what a checkpoint restores for an exact resume (with the
    model, optimizer and RNG states). ``state_dict``/``load_state_dict`` as torch's
    ``Stateful``."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "consumed_samples": self.consumed_samples, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as every rank agrees it went."""

    loss: float          # mean loss over the global batch (nan/inf when not finite)
    finite: bool         # the update was applied
    lr: float
    grad_norm: float     # before clipping; nan when the loss was not finite
    batch_size: int      # samples in this step's global batch (ramp-up changes it)
    stop: bool           # some rank was asked to stop (SIGTERM)


class StopFlag:
    """Set by SIGTERM (Kubernetes deleting the pod); read, and agreed on by all ranks, at
    the end of each step. A context manager that installs and restores the handler."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopFlag":
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum


class NonFiniteGuard:
    """Counts steps whose loss was NaN/inf (their updates are skipped), warning about each
    when ``verbose``, and raises :class:`TrainingDiverged` after ``max_steps`` in a row."""

    def __init__(self, max_steps: int, verbose: bool):
        self.max_steps = max_steps
        self.verbose = verbose
        self.in_a_row = 0
        self.last_finite: tuple[int, float] | None = None

    def check(self, step: int, r: StepResult) -> None:
        if r.finite:
            self.in_a_row = 0
            self.last_finite = (step, r.loss)
            return
        self.in_a_row += 1
        if self.verbose:
            log.warning("step %d: loss %s, grad norm %s: update skipped (%d in a row)",
                        step, r.loss, r.grad_norm, self.in_a_row)
        if self.in_a_row >= self.max_steps:
            where = (f"last finite loss {self.last_finite[1]:.4f} at step {self.last_finite[0]}"
                     if self.last_finite else "no finite loss yet")
            raise TrainingDiverged(
                f"loss was NaN/inf for {self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-"
                f"{step}, train.max_nan_steps={self.max_steps}); {where}. Lower optim.lr, "
                "check the data, or resume from an earlier checkpoint.")

