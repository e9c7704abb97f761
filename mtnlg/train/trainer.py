"""The per-process training loop: what every rank of ``torchrun`` or a PyTorchJob runs.

:func:`train` takes a validated :class:`TrainRunConfig`, joins the process group (gloo on
CPU, NCCL on GPU) from RANK/WORLD_SIZE/..., and runs a :class:`Trainer`, which

1. builds the ``(pp, dp, tp)`` mesh, the GPT on the meta device, the
   :class:`~mtnlg.train.engine.Engine` that shards and runs it (one stage per pipeline
   rank under pipeline parallelism), then allocates and initialises only this rank's
   shards (``mtnlg.parallel.init``: layout-independent values), and AdamW;
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

import gc
from typing import Any

import torch
import torch.distributed as dist

from mtnlg.dist import HostFlags, ProcessEnv, all_reduce_tensor, barrier, broadcast_object, init_process_group
from mtnlg.progress import get_logger
from mtnlg.train.checkpointer import Checkpointer, check_resume
from mtnlg.train.config import TrainRunConfig
from mtnlg.train.data import Prefetcher, open_datasets_per_node, with_tokenizer_vocab
from mtnlg.train.device import (check_dtype_supported, device_peak_tflops, enable_tf32, resolve_device, resolve_dtype,
                                torch_device)
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
        check_resume(cfg)  # a checkpoint of other shapes: one ConfigError, not a size mismatch per rank
        self.device = torch_device(device_type, env.local_rank)
        self.dtype = resolve_dtype(cfg.train.dtype, device_type)
        enable_tf32(device_type)
        self.mesh = dims.build_mesh(device_type)
        self.dp_rank = dims.dp_rank(self.mesh)

        # Same seed on every rank (dropout that must differ across tensor-parallel ranks
        # forks from it per rank). The model is built on the meta device, parallelized, and
        # only this rank's shards are allocated and initialised, each parameter from its own
        # generator: every layout starts from the weights one device would have.
        set_seed_for_rank(cfg.train.seed)
        with torch.device("meta"):
            model = GPT(cfg.model, tp=dims.tp)
        self.scaler = torch.amp.GradScaler(device_type) if self.dtype == "fp16" else None
        self.engine = build_engine(model, self.mesh, dims, cfg, self.device, self.dtype, self.scaler)
        self.engine.materialize(cfg.model, cfg.train.seed)
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
        self.train_ds, valid_ds = open_datasets_per_node(cfg.data, cfg.model.seq_length, t.eval_iters > 0,
                                                         env.local_rank)
        self.validator = Validator(t, self.engine, valid_ds, self.dp_rank, dims.dp)
        self.guard = NonFiniteGuard(t.max_nan_steps, env.is_main)
        self.flags = HostFlags(device_type)
        self.prefetcher = Prefetcher(self.train_ds, self.rampup, self.dp_rank, dims.dp,
                                     pin=device_type == "cuda", enabled=t.prefetch)

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
        agrees happened. Nothing here reads a device tensor back: the loss is all-reduced
        and the gradient norm computed on the device, a NaN/inf in either skips the update
        inside the fused AdamW kernel (its ``found_inf`` input, as a GradScaler drives it),
        and only the stop request is agreed on, over the CPU."""
        s = self.state
        gbs = self.rampup.batch_size(s.consumed_samples)
        tokens = self.prefetcher.get(s.consumed_samples, gbs)
        local_loss = self.engine.forward_backward(tokens)
        loss = all_reduce_tensor(local_loss) / self.engine.loss_ranks
        stop = self.flags.any(stop_requested)
        s.step += 1
        s.consumed_samples += gbs
        lr = self.lr_at(s.step)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.engine.clip_grad_norm(self.cfg.optim.grad_clip)  # grad_clip 0 only measures
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm.to(loss.device))
        self._set_lr(lr)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips itself on inf/NaN gradients
            self.scaler.update()
        else:
            self.optimizer.found_inf = (~finite).to(torch.float32)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, finite=finite, lr=lr, grad_norm=grad_norm, batch_size=gbs, stop=stop)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or a stop); returns the summary on every rank.

        Device values (loss, gradient norm, the non-finite flags) are read only on the
        steps that log, validate or checkpoint; Python's garbage collector runs every
        ``train.gc_every`` steps instead of whenever it likes (0 leaves it automatic)."""
        s, steps = self.state, self.cfg.train.steps
        gc_every = self.cfg.train.gc_every
        if gc_every:
            gc.disable()
        try:
            with StopFlag() as stop:
                summary = self._loop(stop, s, steps, gc_every)
        finally:
            if gc_every:
                gc.enable()
            self.prefetcher.close()
            self.metrics.close()  # a failed run's platform reports stop (a finished run sent its last)
        return summary

    def _loop(self, stop: StopFlag, s: TrainState, steps: int, gc_every: int) -> dict[str, Any]:
        self.checkpointer.maybe_resume()
        start_step = s.step
        self.metrics.start(s, f"training {self.n_params:,} parameters, {self.dims.describe()}, {self.dtype} "
                              f"on {self.device.type}: steps {s.step} -> {steps}")
        stopped, val_loss = "completed", None
        try:
            while s.step < steps:
                r = self.optimizer_step(stop.requested)
                self.guard.add(s.step, r)
                last = s.step >= steps
                validate = self.validator.should_validate(s.step, last)
                save = self.checkpointer.due(s.step, last)
                if validate or save or last or r.stop or self.metrics.should_log(s.step, last, False):
                    self.guard.sync(s)  # the one read of this stretch of steps
                    if not save:
                        self.checkpointer.complete()  # a background save from earlier becomes `latest`
                val = self.validator.validate() if validate else None
                val_loss = val if val is not None else val_loss
                self.metrics.record(s, r, val, last)
                if r.stop:
                    stopped = "signal"
                    break
                if save:
                    self.checkpointer.save(background=True)
                    self.metrics.sync()
                if gc_every and s.step % gc_every == 0:
                    gc.collect(1)
            self.guard.sync(s)
            checkpoint = self.checkpointer.finish(start_step, stopped)
        except TrainingDiverged as e:
            self.checkpointer.complete()  # a background save of a healthy earlier step
            self.metrics.finish(s, None, "diverged", val_loss, self.checkpointer.resumed_from, str(e))
            barrier()  # no rank exits (and gets the others killed) before the summary is written
            raise
        summary = self.metrics.finish(s, checkpoint, stopped, val_loss, self.checkpointer.resumed_from)
        return broadcast_object(summary)


def train(cfg: TrainRunConfig) -> dict[str, Any]:
    """Run this process's part of the training; returns the summary (on every rank)."""
    device_type = resolve_device(cfg.train.device)
    check_dtype_supported(cfg.train.dtype, device_type)  # fp8: a GPU with float8 tensor cores, torchao
    owns_group = not dist.is_initialized()
    env = init_process_group(device_type, cfg.train.collective_timeout_s)
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
