"""Learning-rate schedule and global-batch-size ramp-up, as pure functions of progress.

Both are functions of the optimizer step / consumed samples alone, so resuming a run
needs nothing but those two counters to land on exactly the same values (no scheduler
object state to drift).

* LR: linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine or linear decay
  to ``min_lr`` at step ``decay_steps`` (counted from step 0, like Megatron's
  ``lr_decay_iters``), then ``min_lr``; or constant after warm-up.
* Batch size: MT-NLG (and Megatron's ``--rampup-batch-size START INCREMENT SAMPLES``)
  grew the global batch from 32 to 1920 in steps of 32 over the first 12B tokens. The
  size is a step function of consumed samples: ``start + k * increment`` with
  ``k = floor(consumed / (samples / n_increments))``, capped at the full size, then
  rounded down to a multiple of ``unit`` (micro-batch x data-parallel degree), as
  Megatron-LM's ``decrease_batch_size_if_needed`` does: MT-NLG's ramp in steps of 32 on
  350 or 420 nodes (data-parallel degree 10 or 12) trains 30 or 24 samples in the first
  steps, and consumed samples advance by what was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_steps: int
    decay: str  # "cosine" | "linear" | "constant"
    decay_steps: int

    def __post_init__(self) -> None:
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be cosine, linear or constant, got {self.decay!r}")
        if self.decay != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(f"decay_steps ({self.decay_steps}) must exceed warmup_steps ({self.warmup_steps})")

    def __call__(self, step: int) -> float:
        """LR for optimizer step ``step`` (1-based: the first update uses ``lr(1)``)."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.decay == "constant":
            return self.lr
        if step >= self.decay_steps:
            return self.min_lr
        frac = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)  # in [0, 1)
        if self.decay == "linear":
            coeff = 1.0 - frac
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.min_lr + coeff * (self.lr - self.min_lr)


@dataclass(frozen=True)
class BatchRampup:
    """Global batch size as a function of consumed samples.

    ``start == 0`` disables the ramp-up (always ``global_batch_size``).
    """

    global_batch_size: int
    start: int = 0
    increment: int = 0
    samples: int = 0
    unit: int = 1

    def __post_init__(self) -> None:
        if self.start == 0:
            return
        if not 0 < self.start <= self.global_batch_size:
            raise ValueError(f"ramp-up start {self.start} must be in [1, global batch {self.global_batch_size}]")
        if self.increment <= 0 or (self.global_batch_size - self.start) % self.increment:
            raise ValueError(f"global batch {self.global_batch_size} - ramp-up start {self.start} must be a "
                             f"positive multiple of the increment {self.increment}")
        if self.samples <= 0:
            raise ValueError(f"ramp-up samples must be > 0, got {self.samples}")
        if self.unit < 1 or self.global_batch_size % self.unit or self.start < self.unit:
            raise ValueError(f"ramp-up unit {self.unit} must divide the global batch {self.global_batch_size} "
                             f"and be at most the start {self.start}")

    @property
    def enabled(self) -> bool:
        return self.start > 0 and self.start < self.global_batch_size

    def batch_size(self, consumed_samples: int) -> int:
        if not self.enabled or consumed_samples >= self.samples:
            return self.global_batch_size
        n_increments = (self.global_batch_size - self.start) // self.increment
        per_increment = self.samples / n_increments
        k = int(consumed_samples / per_increment)
        size = min(self.start + k * self.increment, self.global_batch_size)
        return size // self.unit * self.unit

    def samples_after(self, steps: int, consumed_samples: int = 0) -> int:
        """Consumed samples after ``steps`` more steps starting at ``consumed_samples``."""
        for i in range(steps):
            if not self.enabled or consumed_samples >= self.samples:
                return consumed_samples + self.global_batch_size * (steps - i)  # past the ramp
            consumed_samples += self.batch_size(consumed_samples)
        return consumed_samples
