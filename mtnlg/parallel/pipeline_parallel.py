"""Pipeline parallelism: one stage of a ``GPT`` per pipeline rank, run by a schedule.

The whole single-device ``GPT`` is built on every rank (same seed, so every layout starts
from the same weights), then :func:`split_stage` keeps only what this stage owns, *under
the original names* (torchtitan's approach): stage 0 keeps ``tok_embeddings`` (and
``pos_embeddings``), the last stage ``norm`` and ``output``, and each stage its share of
``layers.{i}``, held in a ``ModuleDict`` keyed by the global index ``i``. So parameter and
state-dict keys are global, one DCP checkpoint written by all stages holds the whole
model, and ``mtnlg fuse`` reads it unchanged. Tensor, sequence and data parallelism are
then applied to the stage by the usual ``parallelize_gpt`` on the stage's ``(dp, tp)``
mesh; only stage-boundary hidden states, (mb, T, H) (or (mb, T/tp, H) under sequence
parallelism, each tensor-parallel rank sending its own chunk), travel between stages,
over the ``"pp"`` mesh dimension, by ``torch.distributed.pipelining``::

    pipe = PipelineParallel(GPT(cfg), mesh, dims, parallel_cfg, device)   # mesh: (pp, dp, tp)
    loss = pipe.forward_backward(x, y, n_micro)   # mean loss on the last stage, else None

Tied embeddings cannot be split across stages (``ParallelDims.build`` refuses
``tie_embeddings`` with ``pp > 1``). Gradients equal those of the mean loss over the
micro-batches (the schedule scales each micro-batch's gradient by 1 / n_micro).
"""

from __future__ import annotations

import torch
from torch import nn

from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT, embed
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.loss import cross_entropy, loss_parallel_context
from mtnlg.parallel.parallelize import parallelize_gpt


class GPTStage(nn.Module):
    """A contiguous slice of a ``GPT``: tokens (B, T) on the first stage, hidden states
    (B, T, H) elsewhere -> hidden states (B, T, H), or logits (B, T, V_padded) on the last
    stage. Submodule names are the ``GPT``'s, so state-dict keys are global."""

    def __init__(self, model: GPT, layers: range, first: bool, last: bool):
        super().__init__()
        cfg = model.cfg
        self.cfg: ModelConfig = cfg
        self.vocab_size_padded = model.vocab_size_padded
        self.first, self.last = first, last
        if first:
            self.tok_embeddings = model.tok_embeddings
            if cfg.position == "learned":
                self.pos_embeddings = model.pos_embeddings
            self.drop = model.drop
        self.register_buffer("pos_table", model.pos_table if first else None, persistent=False)
        self.register_buffer("rope", model.rope, persistent=False)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        if last:
            self.norm = model.norm
            self.output = model.output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = embed(self, x)                                                   # (B, T, H)
        # the whole (T, hd/2, 2) table: training sequences are model.seq_length long, and
        # under sequence parallelism a later stage sees only its chunk (B, T/tp, H) of
        # them while attention works on the gathered sequence
        for layer in self.layers.values():
            x = layer(x, self.rope)                                              # (B, T, H)
        if self.last:
            x = self.output(self.norm(x))                                        # (B, T, V_padded)
        return x


def split_stage(model: GPT, layers: range, first: bool, last: bool) -> GPTStage:
    """This stage's part of ``model`` (shared modules, not copies)."""
    return GPTStage(model, layers, first, last)


class PipelineParallel:
    """This rank's pipeline stage (parallelized) and its schedule.

    ``model`` is the whole single-device GPT (on ``device``); ``mesh`` the ``(pp, dp, tp)``
    mesh of ``ParallelDims.build_mesh``. ``self.model`` is the stage module to give the
    optimizer, the checkpointer and gradient clipping."""

    def __init__(self, model: GPT, mesh, dims, cfg: ParallelConfig, device: torch.device):
        from torch.distributed.pipelining import PipelineStage

        self.pp_rank = dims.pp_rank(mesh)
        self.pp = dims.pp
        self.first, self.last = self.pp_rank == 0, self.pp_rank == dims.pp - 1
        self.tp = dims.tp
        self.schedule_name = cfg.pp_schedule
        stage = split_stage(model, dims.stage_layers(self.pp_rank), self.first, self.last)
        self.model = parallelize_gpt(stage, mesh["dp", "tp"], cfg)
        self.group = mesh.get_group("pp")
        self.stage = PipelineStage(self.model, self.pp_rank, dims.pp, device, group=self.group)
        self._schedules: dict[int, object] = {}

    def _schedule(self, n_micro: int):
        """One schedule per micro-batch count (batch-size ramp-up changes it)."""
        if n_micro not in self._schedules:
            from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

            cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
            self._schedules[n_micro] = cls(self.stage, n_microbatches=n_micro,
                                           loss_fn=cross_entropy, scale_grads=True)
        return self._schedules[n_micro]

    def _run(self, x: torch.Tensor, y: torch.Tensor, n_micro: int, train: bool) -> float | None:
        schedule = self._schedule(n_micro)
        run = schedule.step if train else schedule.eval
        losses: list[torch.Tensor] = []
        with loss_parallel_context(self.tp > 1):
            if self.first and self.last:
                run(x, target=y, losses=losses)
            elif self.first:
                run(x)
            elif self.last:
                run(target=y, losses=losses)
            else:
                run()
        if not self.last:
            return None
        return float(torch.stack([loss.detach().float() for loss in losses]).mean())

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, n_micro: int) -> float | None:
        """x, y (b_local, T): gradients of the mean loss over ``n_micro`` micro-batches of
        the rows; returns that mean loss on the last stage, None on the others."""
        return self._run(x, y, n_micro, train=True)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, n_micro: int) -> float | None:
        """Forward only; the mean loss on the last stage, None on the others."""
        return self._run(x, y, n_micro, train=False)
