"""The per-process training loop: what every rank of ``torchrun`` or a PyTorchJob runs.

:func:`train` takes a validated :class:`TrainRunConfig`, joins the process group (gloo on
CPU, NCCL on GPU) from RANK/WORLD_SIZE/..., and runs a :class:`Trainer`, which

1. builds the ``(pp, dp, tp)`` mesh, the GPT (same seed on every rank, so every layout
   starts from the same weights) and the :class:`~mtnlg.train.engine.Engine` that shards
   and runs it (one stage per pipeline rank under pipeline parallelism), and AdamW;
2. resumes from a checkpoint when there is one (``checkpoint.load=auto``): weights,
   optimizer, RNG states and the data position, so the continuation is bit-identical;
3. per step: reads this data-parallel rank's slice of the global batch at the current
   consumed-sample position, runs forward and backward, skips the update if the loss is
   NaN/inf (aborting after ``max_nan_steps`` in a row), clips, sets the scheduled LR,
   steps; then validates, logs and checkpoints when their cadence says so;
4. on SIGTERM (Kubernetes deleting the pod) finishes the current step, saves a checkpoint
   and returns normally.

The pieces with a cadence or state of their own live beside it: ``engine`` (forward and
backward), ``validator``, ``metrics`` (rank 0's files), ``checkpointer``, ``state``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from mtnlg.dist import ProcessEnv, all_reduce_sum, barrier, broadcast_object, init_process_group
from mtnlg.progress import get_logger
from mtnlg.train.checkpointer import Checkpointer
from mtnlg.train.config import TrainRunConfig
from mtnlg.train.data import open_datasets, with_tokenizer_vocab
from mtnlg.train.device import device_peak_tflops, enable_tf32, resolve_device, resolve_dtype, torch_device
from mtnlg.train.engine import build_engine
from mtnlg.train.metrics import MetricsProcessor
from mtnlg.train.optim import build_optimizer
from mtnlg.train.schedule import BatchRampup, LRSchedule
from mtnlg.train.state import NonFiniteGuard, StepResult, StopFlag, TrainingDiverged, TrainState
from mtnlg.train.validator import Validator

log = get_logger("mtnlg.train")


class Trainer:
    """One process's share of a run; build with a config, then :meth:`run`."""

    def __init__(self, cfg: TrainRunConfig, env: ProcessEnv, device_type: str):
        from mtnlg.model.flops import count_parameters, flops_per_token
        from mtnlg.model.gpt import GPT
        from mtnlg.parallel.utils import set_seed_for_rank

        self.env = env
        self.cfg = cfg = with_tokenizer_vocab(cfg, env.is_main)
        self.dims = dims = cfg.check_layout(env.world_size)
        self.device = torch_device(device_type, env.local_rank)
        self.dtype = resolve_dtype(cfg.train.dtype, device_type)
        enable_tf32(device_type)
        self.mesh = dims.build_mesh(device_type)
        self.dp_rank = dims.dp_rank(self.mesh)

        # Same seed on every rank: every layout starts from the one-device model's weights
        # (dropout that must differ across tensor-parallel ranks forks from it per rank).
        set_seed_for_rank(cfg.train.seed)
        with torch.device(self.device):
            model = GPT(cfg.model, tp=dims.tp)
        self.scaler = torch.amp.GradScaler(device_type) if self.dtype == "fp16" else None
        self.engine = build_engine(model, self.mesh, dims, cfg, self.device, self.dtype, self.scaler)
        o, t = cfg.optim, cfg.train
        self.optimizer = build_optimizer(self.engine.model, o.lr, o.betas, o.eps, o.weight_decay)
        self.lr_at = LRSchedule(o.lr, o.min_lr, cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.decay_steps)
        self.rampup = BatchRampup(t.global_batch_size, t.rampup.start, t.rampup.increment, t.rampup.samples,
                                  unit=t.micro_batch_size * dims.dp)

        self.state = TrainState()
        self.n_params = count_parameters(cfg.model, dims.tp)
        self.peak = device_peak_tflops(device_type, self.dtype)
        description = {"parameters": self.n_params, "flops_per_token": flops_per_token(cfg.model, dims.tp),
                       "peak_tflops": self.peak, "world_size": env.world_size, "layout": dims.as_dict(),
                       "device": device_type, "dtype": self.dtype, "plan": self._plan_estimate(device_type)}
        self.checkpointer = Checkpointer(cfg, self.engine.model, self.optimizer, self.state, self.scaler,
                                         self.engine.flatten_optimizer,
                                         {"layout": dims.as_dict(), "parameters": self.n_params}, env.is_main)
        self.metrics = MetricsProcessor(cfg, env.is_main, description)
        self.train_ds, valid_ds = open_datasets(cfg.data, cfg.model.seq_length, want_valid=t.eval_iters > 0)
        self.validator = Validator(t, self.engine, valid_ds, self.dp_rank, dims.dp)
        self.guard = NonFiniteGuard(t.max_nan_steps, env.is_main)

    def _plan_estimate(self, device_type: str):
        """The planner's estimate for this run's layout on this GPU kind (None on CPUs and
        GPUs the planner has no constants for)."""
        from mtnlg.plan.hardware import gpu_for_device_name
        from mtnlg.train.config import plan_estimate

        if device_type != "cuda":
            return None
        gpu = gpu_for_device_name(torch.cuda.get_device_name())
        return plan_estimate(self.cfg, self.dims, gpu) if gpu is not None else None

    # ------------------------------------------------------------------ one step

    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def optimizer_step(self, stop_requested: bool) -> StepResult:
        """One optimizer step (or a skipped one) over the next global batch; what every rank
        agrees happened."""
        s = self.state
        gbs = self.rampup.batch_size(s.consumed_samples)
        tokens = self.train_ds.global_batch(s.consumed_samples, gbs, self.dp_rank, self.dims.dp)
        local_loss = self.engine.forward_backward(tokens)
        # One collective for the loss (the mean over the loss ranks) and the stop request.
        loss_sum, stops = all_reduce_sum([local_loss, 1.0 if stop_requested else 0.0], self.engine.device)
        loss = loss_sum / self.engine.loss_ranks
        finite = math.isfinite(loss)
        s.step += 1
        s.consumed_samples += gbs
        lr = self.lr_at(s.step)
        grad_norm = float("nan")
        if finite:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = self.engine.clip_grad_norm(self.cfg.optim.grad_clip)  # grad_clip 0 only measures
            self._set_lr(lr)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips itself on inf/NaN gradients
                self.scaler.update()
            elif math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                finite = False  # finite loss, non-finite gradients: skip the update too
        if not finite:
            s.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, finite=finite, lr=lr, grad_norm=grad_norm, batch_size=gbs, stop=stops > 0)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or a stop); returns the summary on every rank."""
        s, steps = self.state, self.cfg.train.steps
        with StopFlag() as stop:
            self.checkpointer.maybe_resume()
            start_step = s.step
            self.metrics.start(s, f"training {self.n_params:,} parameters, {self.dims.describe()}, {self.dtype} "
                                  f"on {self.device.type}: steps {s.step} -> {steps}")
            stopped, val_loss = "completed", None
            try:
                while s.step < steps:
                    r = self.optimizer_step(stop.requested)
                    self.guard.check(s.step, r)
                    last = s.step >= steps
                    val = self.validator.validate() if self.validator.should_validate(s.step, last) else None
                    val_loss = val if val is not None else val_loss
                    self.metrics.record(s, r, val, last)
                    if r.stop:
                        stopped = "signal"
                        break
                    if self.checkpointer.maybe_save(s.step, last_step=last):
                        self.metrics.sync()
                checkpoint = self.checkpointer.finish(start_step, stopped)
            except TrainingDiverged as e:
                self.metrics.finish(s, None, "diverged", val_loss, self.checkpointer.resumed_from, str(e))
                barrier()  # no rank exits (and gets the others killed) before the summary is written
                raise
        summary = self.metrics.finish(s, checkpoint, stopped, val_loss, self.checkpointer.resumed_from)
        return broadcast_object(summary)


def train(cfg: TrainRunConfig) -> dict[str, Any]:
    """Run this process's part of the training; returns the summary (on every rank)."""
    device_type = resolve_device(cfg.train.device)
    owns_group = not dist.is_initialized()
    env = init_process_group(device_type)
    ok = False
    try:
        summary = Trainer(cfg, env, device_type).run()
        ok = True
        return summary
    finally:
        if owns_group and dist.is_initialized():
            if ok:
                # Leave together: a rank tearing gloo down while its peer is still inside a
                # collective can abort the peer ("terminate called without an active exception").
                dist.barrier()
            dist.destroy_process_group()
