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
    """One optimizer step, as every rank agrees it went. The tensors stay on the device
    (0-d) until a logging step reads them, so other steps never wait for the device."""

    loss: Any            # 0-d tensor: mean loss over the global batch (nan/inf when not finite)
    finite: Any          # 0-d bool tensor: the update was applied
    lr: float
    grad_norm: Any       # 0-d tensor: before clipping
    batch_size: int      # samples in this step's global batch (ramp-up changes it)
    stop: bool           # some rank was asked to stop (SIGTERM), agreed over the CPU


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
    """Counts steps whose loss or gradient norm was NaN/inf (their updates were skipped on
    the device, without the host waiting), warning about each when ``verbose``, and raises
    :class:`TrainingDiverged` after ``max_steps`` in a row. Steps are queued by :meth:`add`
    and read in one go by :meth:`sync`, which the trainer calls on logging, validation and
    checkpoint steps: a diverging run stops at the first of those after ``max_steps``
    non-finite steps in a row."""

    def __init__(self, max_steps: int, verbose: bool):
        self.max_steps = max_steps
        self.verbose = verbose
        self.in_a_row = 0
        self.last_finite: tuple[int, float] | None = None
        self.pending: list[tuple[int, StepResult]] = []

    def add(self, step: int, r: StepResult) -> None:
        self.pending.append((step, r))

    def sync(self, state: "TrainState") -> None:
        """Read the queued steps (one host read), adding the skipped ones to
        ``state.skipped_steps`` (before raising, too)."""
        if not self.pending:
            return
        import torch

        rows = torch.stack([torch.stack([r.finite.float().reshape(()), r.loss.float().reshape(()),
                                         r.grad_norm.float().reshape(()).to(r.loss.device)])
                            for _, r in self.pending]).tolist()
        steps = [step for step, _ in self.pending]
        self.pending.clear()
        for step, (finite, loss, grad_norm) in zip(steps, rows):
            if finite:
                self.in_a_row = 0
                self.last_finite = (step, loss)
                continue
            state.skipped_steps += 1
            self.in_a_row += 1
            if self.verbose:
                log.warning("step %d: loss %s, grad norm %s: update skipped (%d in a row)",
                            step, loss, grad_norm, self.in_a_row)
            if self.in_a_row >= self.max_steps:
                where = (f"last finite loss {self.last_finite[1]:.4f} at step {self.last_finite[0]}"
                         if self.last_finite else "no finite loss yet")
                raise TrainingDiverged(
                    f"loss was NaN/inf for {self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-"
                    f"{step}, train.max_nan_steps={self.max_steps}); {where}. Lower optim.lr, "
                    "check the data, or resume from an earlier checkpoint.")
