"""Pipeline parallelism: the layers of a ``GPT`` split over pipeline ranks, run by a schedule.

The whole single-device ``GPT`` is built on every rank (same seed, so every layout starts
from the same weights), then :func:`split_stage` keeps only what a stage owns, *under
the original names* (torchtitan's approach): the first stage keeps ``tok_embeddings`` (and
``pos_embeddings``), the last stage ``norm`` and ``output``, and each stage its share of
``layers.{i}``, held in a ``ModuleDict`` keyed by the global index ``i``. So parameter and
state-dict keys are global, one DCP checkpoint written by all stages holds the whole
model, and ``mtnlg fuse`` reads it unchanged. Tensor, sequence and data parallelism are
then applied to each stage by the usual ``parallelize_gpt`` on the stage's ``(dp, tp)``
mesh; only stage-boundary hidden states, (mb, T, H) (or (mb, T/tp, H) under sequence
parallelism, each tensor-parallel rank sending its own chunk), travel between stages,
over the ``"pp"`` mesh dimension, by ``torch.distributed.pipelining``::

    pipe = PipelineParallel(GPT(cfg), mesh, dims, parallel_cfg, device)   # mesh: (pp, dp, tp)
    loss = pipe.forward_backward(x, y, n_micro)   # mean loss on the last stage, else None

Schedules: 1F1B (``Schedule1F1B``; a step with fewer micro-batches than stages, as in the
first steps of a batch-size ramp-up, runs fill-drain (``ScheduleGPipe``) instead, which
keeps the same at most ``pp`` micro-batches in flight), GPipe, and interleaved 1F1B with
``parallel.pp_virtual = v > 1`` virtual stages (``ScheduleInterleaved1F1B``): the layers are
cut into ``pp * v`` chunks and rank ``r`` holds chunks ``r, r + pp, ...``, so the bubble
shrinks v-fold for v times the point-to-point traffic. A rank's chunks are gathered, for
the optimizer, the checkpoint and clipping, into one module under the same global names
(:class:`StageChunks`).

Tied input/output embeddings across stages (Megatron's approach): the last stage holds its
own copy of the embedding table as ``output.weight``, initialised from the same seed and
so equal to the first stage's ``tok_embeddings.weight``; after every backward the two
gradients are summed over a group of the two ranks (:meth:`PipelineParallel.sync_tied_grads`)
so both copies see the gradient of the shared weight and stay bitwise equal under the same
optimizer update; the norm for clipping counts the table once. Gradients equal those of
the mean loss over the micro-batches (the schedule scales each micro-batch's gradient by
1 / n_micro).
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


class StageChunks(nn.Module):
    """A rank's pipeline chunks as one module, under the global names (``layers.{i}``,
    ``tok_embeddings``, ``output``, ...) of the modules the chunks run: what the optimizer,
    the checkpoint and clipping see. Never called; the chunks are."""

    def __init__(self, chunks: list[GPTStage]):
        super().__init__()
        self.layers = nn.ModuleDict()
        for chunk in chunks:
            for name, layer in chunk.layers.items():
                self.layers[name] = layer
            for name in ("tok_embeddings", "pos_embeddings", "norm", "output"):
                if hasattr(chunk, name) and isinstance(getattr(chunk, name), nn.Module):
                    self.add_module(name, getattr(chunk, name))

    def forward(self, *args, **kwargs):  # noqa: ARG002
        raise RuntimeError("StageChunks is not run; its pipeline chunks are")


class PipelineParallel:
    """This rank's pipeline stage(s) (parallelized) and their schedule.

    ``model`` is the whole single-device GPT (on ``device``); ``mesh`` the ``(pp, dp, tp)``
    mesh of ``ParallelDims.build_mesh``. ``self.model`` is the stage module (or
    :class:`StageChunks` of the rank's virtual stages) to give the optimizer, the
    checkpointer and gradient clipping."""

    def __init__(self, model: GPT, mesh, dims, cfg: ParallelConfig, device: torch.device, param_dtype=None):
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage

        self.pp_rank = dims.pp_rank(mesh)
        self.pp = dims.pp
        self.first, self.last = self.pp_rank == 0, self.pp_rank == dims.pp - 1
        self.tp = dims.tp
        self.schedule_name = cfg.pp_schedule
        n_chunks = dims.pp * dims.virtual_stages
        self.group = mesh.get_group("pp")
        self.chunks: list[GPTStage] = []
        self.stages = []
        for index in dims.stage_indices(self.pp_rank):
            chunk = split_stage(model, dims.chunk_layers(index), index == 0, index == n_chunks - 1)
            chunk = parallelize_gpt(chunk, mesh["dp", "tp"], cfg, param_dtype=param_dtype)
            self.chunks.append(chunk)
            self.stages.append(PipelineStage(chunk, index, n_chunks, device, group=self.group))
        self.model = self.chunks[0] if len(self.chunks) == 1 else StageChunks(self.chunks)
        self.stage = self.stages[0]
        # Tied embeddings: one group per (dp, tp) position, of its first- and last-stage ranks
        # (every rank takes part in creating every group).
        self.tied_group = None
        if model.cfg.tie_embeddings:
            me = dist.get_rank()
            for ranks in dims.pp_groups():
                group = dist.new_group([ranks[0], ranks[-1]])
                if me in (ranks[0], ranks[-1]):
                    self.tied_group = group
        self._schedules: dict[int, object] = {}

    @property
    def tied_copy(self) -> list[torch.Tensor]:
        """The last stage's copy of the tied table (for clipping's ``duplicates``); looked up
        each time, since materializing a meta model replaces the parameter objects."""
        return [self.model.output.weight] if self.tied_group is not None and self.last else []

    def tied_weight(self) -> torch.Tensor | None:
        """This rank's copy of the tied embedding table, if it holds one."""
        if self.tied_group is None:
            return None
        return self.model.tok_embeddings.weight if self.first else self.model.output.weight

    def sync_tied_grads(self) -> None:
        """Sum the tied table's gradient over its first- and last-stage copies (collective
        over the two ranks; a no-op elsewhere)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        w = self.tied_weight()
        if w is None:
            return
        g = w.grad
        if g is None:
            g = torch.zeros_like(w)
            w.grad = g
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(w.placements):
            # a vocab-parallel lookup's gradient can come back replicated: shard it as the
            # weight is (a local slice), so both stages reduce the same rows
            g = g.redistribute(w.device_mesh, w.placements)
            w.grad = g
        local = g.to_local() if isinstance(g, DTensor) else g
        dist.all_reduce(local, group=self.tied_group)

    def _schedule(self, n_micro: int):
        """One schedule per micro-batch count (batch-size ramp-up changes it)."""
        if n_micro not in self._schedules:
            from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

            if len(self.stages) > 1:
                self._schedules[n_micro] = ScheduleInterleaved1F1B(self.stages, n_microbatches=n_micro,
                                                                   loss_fn=cross_entropy, scale_grads=True)
            else:
                # 1F1B with fewer micro-batches than stages is all fill and drain: GPipe
                one_f_one_b = self.schedule_name == "1f1b" and n_micro >= self.pp
                cls = Schedule1F1B if one_f_one_b else ScheduleGPipe
                self._schedules[n_micro] = cls(self.stage, n_microbatches=n_micro,
                                               loss_fn=cross_entropy, scale_grads=True)
        return self._schedules[n_micro]

    def _run(self, x: torch.Tensor, y: torch.Tensor, n_micro: int, train: bool) -> torch.Tensor | None:
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
        if train:
            self.sync_tied_grads()
        if not self.last:
            return None
        return torch.stack([loss.detach().float() for loss in losses]).mean()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, n_micro: int) -> torch.Tensor | None:
        """x, y (b_local, T): gradients of the mean loss over ``n_micro`` micro-batches of
        the rows; returns that mean loss (a 0-d tensor, not read back) on the last stage,
        None on the others."""
        return self._run(x, y, n_micro, train=True)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, n_micro: int) -> torch.Tensor | None:
        """Forward only; the mean loss on the last stage, None on the others."""
        return self._run(x, y, n_micro, train=False)
