"""Forward and backward over one rank's slice of a global batch, behind one interface.

The trainer never asks whether the run is pipeline parallel: it hands each step's tokens to
an :class:`Engine` and reads back a loss. Two engines implement it:

* :class:`LocalEngine`: the whole model on this rank's ``(dp, tp)`` coordinates (tensor,
  sequence and data parallelism applied by ``parallelize_gpt``); gradients are accumulated
  over micro-batches, the data-parallel reduction running only after the last one. With
  context parallelism (``parallel.cp > 1``) each micro-batch's sequences are cut to this
  rank's two chunks (``mtnlg.parallel.cp``), run at their global positions, and the
  gradients averaged over ``dp * cp`` ranks.
* :class:`PipelineEngine`: this rank's pipeline stage, run by a
  ``torch.distributed.pipelining`` schedule (``mtnlg.parallel.pipeline_parallel``); only
  the last stage computes a loss. With context parallelism the slice's sequences are cut
  to this rank's two chunks before the schedule splits them into micro-batches; every
  stage runs them at their global positions.

Both report a loss the same way: every rank returns its share, and the world-wide sum
divided by :attr:`Engine.loss_ranks` (the number of ranks that compute a loss) is the mean
loss over the global batch.

    engine = build_engine(GPT(cfg.model, tp=dims.tp), mesh, dims, cfg, device, dtype, scaler)
    loss = engine.forward_backward(tokens)      # tokens (b_local, T+1) int64
    grad_norm = engine.clip_grad_norm(1.0)
"""

from __future__ import annotations

import abc
import contextlib

import numpy as np
import torch
from torch import nn

from mtnlg.config import ConfigError
from mtnlg.parallel.cp import chunk_positions, shard_sequence
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.loss import cross_entropy, loss_parallel_context
from mtnlg.parallel.utils import clip_grad_norm_, set_requires_gradient_sync, set_seed_for_rank


def autocast(device_type: str, dtype: str):
    """The mixed-precision context for ``dtype`` ("fp32" runs without one; "fp8" in bf16,
    its float8 layers casting for themselves)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.float16 if dtype == "fp16" else torch.bfloat16)


class Engine(abc.ABC):
    """This rank's part of the model and how to run a batch through it."""

    model: nn.Module      # what the optimizer, the checkpointer and clipping see
    loss_ranks: int       # ranks whose losses are summed into the global mean
    flatten_optimizer: bool  # optimizer state keyed by parameter name (see formats.checkpoint)

    def __init__(self, dims: ParallelDims, device: torch.device, dtype: str, micro_batch_size: int):
        self.dims = dims
        self.device = device
        self.dtype = dtype
        self.micro_batch_size = micro_batch_size

    def _autocast(self):
        return autocast(self.device.type, self.dtype)

    def _to_device(self, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T+1) int64 (a NumPy array, or a tensor in pinned memory from the prefetcher)
        -> inputs and targets, each (b, T), on the device (an asynchronous copy from
        pinned memory)."""
        chunk = tokens if isinstance(tokens, torch.Tensor) else torch.from_numpy(tokens)
        chunk = chunk.to(self.device, non_blocking=True)
        return chunk[:, :-1], chunk[:, 1:]

    def n_micro(self, tokens: np.ndarray) -> int:
        return tokens.shape[0] // self.micro_batch_size

    def materialize(self, model_cfg, seed: int) -> None:
        """Allocate this rank's shards of a model built on the meta device and initialise
        them (``mtnlg.parallel.init.materialize``)."""
        from mtnlg.parallel.init import materialize

        for module in self.modules_to_materialize():
            materialize(module, model_cfg, self.device, seed)

    def modules_to_materialize(self) -> list[nn.Module]:
        return [self.model]

    @abc.abstractmethod
    def forward_backward(self, tokens: np.ndarray) -> torch.Tensor:
        """Gradients of the mean loss over this rank's rows; returns this rank's share of
        the loss as a 0-d float32 tensor on the device (its mean loss, or 0 where the rank
        computes none), never read back here."""

    @abc.abstractmethod
    def evaluate(self, tokens: np.ndarray) -> list[float]:
        """Losses without gradients: one per micro-batch, or one for the whole slice
        (0.0 where the rank computes none)."""

    @abc.abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to a global norm of ``max_norm`` (0 only measures); returns
        the norm before clipping as a 0-d tensor (not read back). Collective."""


class LocalEngine(Engine):
    """Every layer on this rank: gradient accumulation over micro-batches."""

    flatten_optimizer = False

    def __init__(self, model: nn.Module, dims: ParallelDims, device: torch.device, dtype: str,
                 micro_batch_size: int, scaler: torch.amp.GradScaler | None, sync_every_micro_batch: bool = False,
                 cp_rank: int = 0):
        super().__init__(dims, device, dtype, micro_batch_size)
        self.model = model
        self.cp_rank = cp_rank
        self.scaler = scaler
        self.loss_ranks = dims.world_size
        self.sync_every_micro_batch = sync_every_micro_batch

    def _micro_batches(self, tokens: np.ndarray):
        """(b_local, T+1) -> micro-batches of (inputs, targets), each (mb, T), or with
        context parallelism this rank's (mb, T/cp) positions of them."""
        mb = self.micro_batch_size
        for i in range(0, tokens.shape[0], mb):
            x, y = self._to_device(tokens[i:i + mb])
            if self.dims.cp > 1:
                x, y = shard_sequence(x, self.dims.cp, self.cp_rank), shard_sequence(y, self.dims.cp, self.cp_rank)
            yield x, y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the micro-batch's inputs (at this rank's global positions under cp)."""
        if self.dims.cp == 1:
            return self.model(x)
        T = x.shape[1] * self.dims.cp
        return self.model(x, position_ids=chunk_positions(T, self.dims.cp, self.cp_rank, device=x.device))

    def forward_backward(self, tokens: np.ndarray) -> torch.Tensor:
        n_micro = self.n_micro(tokens)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for i, (x, y) in enumerate(self._micro_batches(tokens)):
            # Data-parallel gradient reduction only after the last micro-batch (DDP, and
            # FSDP with parallel.fsdp_grad_sync=step), or after each (FSDP's default).
            set_requires_gradient_sync(self.model, self.sync_every_micro_batch or i == n_micro - 1)
            with loss_parallel_context(self.dims.tp > 1):
                with self._autocast():
                    logits = self._forward(x)                                    # (mb, T, V_padded)
                loss = cross_entropy(logits, y)                                  # mean over mb*T
                scaled = loss / n_micro
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            total += loss.detach().float()
        return total / n_micro

    @torch.no_grad()
    def evaluate(self, tokens: np.ndarray) -> list[float]:
        losses = []
        for x, y in self._micro_batches(tokens):
            with loss_parallel_context(self.dims.tp > 1), self._autocast():
                losses.append(float(cross_entropy(self._forward(x), y)))
        return losses

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(self.model.parameters(), max_norm)


class PipelineEngine(Engine):
    """This rank's pipeline stage; the schedule runs every micro-batch of the slice."""

    flatten_optimizer = True  # each stage's optimizer holds different parameters

    def __init__(self, model: nn.Module, mesh, dims: ParallelDims, cfg, device: torch.device, dtype: str,
                 micro_batch_size: int, param_dtype=None):
        from mtnlg.parallel.pipeline_parallel import PipelineParallel

        if dtype == "fp16":
            raise ConfigError("train.dtype=fp16 (loss scaling) is not supported with parallel.pp > 1; "
                              "use bf16 or fp32")
        super().__init__(dims, device, dtype, micro_batch_size)
        self.pipeline = PipelineParallel(model, mesh, dims, cfg, device, param_dtype=param_dtype)
        self.model = self.pipeline.model  # this stage only, under global parameter names
        self.pp_group = mesh.get_group("pp")
        self.cp_rank = dims.cp_rank(mesh)
        # the last stage's ranks: each cp rank's loss is the mean over its T/cp targets of
        # the same rows, so their average is the mean over the whole sequences
        self.loss_ranks = dims.world_size // dims.pp

    def modules_to_materialize(self) -> list[nn.Module]:
        return list(self.pipeline.chunks)

    def _run(self, tokens: np.ndarray, train: bool) -> torch.Tensor:
        x, y = self._to_device(tokens)                                           # (b_local, T)
        if self.dims.cp > 1:  # this rank's two chunks of every sequence; the stages know their positions
            x, y = shard_sequence(x, self.dims.cp, self.cp_rank), shard_sequence(y, self.dims.cp, self.cp_rank)
        with self._autocast():
            run = self.pipeline.forward_backward if train else self.pipeline.evaluate
            loss = run(x, y, self.n_micro(tokens))
        return torch.zeros((), dtype=torch.float32, device=self.device) if loss is None else loss

    def forward_backward(self, tokens: np.ndarray) -> torch.Tensor:
        return self._run(tokens, train=True)

    def evaluate(self, tokens: np.ndarray) -> list[float]:
        return [float(self._run(tokens, train=False))]

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        # each stage holds different parameters: their squared norms are summed over stages
        return clip_grad_norm_(self.model.parameters(), max_norm, pp_group=self.pp_group,
                               duplicates=self.pipeline.tied_copy)


def build_engine(model: nn.Module, mesh, dims: ParallelDims, cfg, device: torch.device, dtype: str,
                 scaler: torch.amp.GradScaler | None) -> Engine:
    """Parallelize ``model`` (the whole one-device GPT, on the meta device or built with the
    run's seed) for this rank and wrap it in the engine the layout needs; a meta model is
    then allocated with :meth:`Engine.materialize`. ``cfg`` is the ``TrainRunConfig``;
    ``mesh`` the ``(pp, dp, tp)`` mesh of ``ParallelDims.build_mesh`` (``(pp, dp, cp, tp)``
    with ``cp > 1``)."""
    from mtnlg.parallel.parallelize import parallelize_gpt

    mb = cfg.train.micro_batch_size
    if dtype == "fp8":
        from mtnlg.parallel.float8 import convert_to_float8

        # the whole model, before TP, the pipeline split, checkpointing, compile and DP see it
        convert_to_float8(model)
    # FSDP2 gathers bf16 parameters and reduces fp32 gradients on a bf16 (or fp8) run
    param_dtype = torch.bfloat16 if dtype in ("bf16", "fp8") and dims.fsdp else None
    if dims.pp == 1:
        every = dims.fsdp and cfg.parallel.fsdp_grad_sync == "micro_batch"
        model = parallelize_gpt(model, mesh, dims, activation_checkpoint=cfg.parallel.activation_checkpoint,
                                compile=cfg.parallel.compile, param_dtype=param_dtype)
        return LocalEngine(model, dims, device, dtype, mb, scaler, sync_every_micro_batch=every,
                           cp_rank=dims.cp_rank(mesh))
    engine = PipelineEngine(model, mesh, dims, cfg.parallel, device, dtype, mb, param_dtype=param_dtype)
    # dropout draws differ per stage (Megatron); the weights were drawn alike, before
    set_seed_for_rank(cfg.train.seed, dims.pp_rank(mesh))
    return engine
