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
over the ``"pp"`` mesh dimension, by ``torch.distributed.pipelining``. With context
parallelism (``cp > 1``) the stage's mesh is ``(dp, cp, tp)``, a stage holds the rank's two
chunks of every sequence (the caller shards tokens and targets, ``mtnlg.parallel.cp``),
and every stage runs them at their global positions (:class:`GPTStage`), so the
boundary tensors are (mb, T/cp, H)::

    pipe = PipelineParallel(GPT(cfg), mesh, dims, parallel_cfg, device)   # mesh: (pp, dp[, cp], tp)
    loss = pipe.forward_backward(x, y, n_micro)   # mean loss on the last stage, else None

Schedules (``parallel.pp_schedule``): 1F1B (``Schedule1F1B``; a step with fewer
micro-batches than stages, as in the first steps of a batch-size ramp-up, runs fill-drain
(``ScheduleGPipe``) instead, which keeps the same at most ``pp`` micro-batches in flight),
GPipe, and interleaved 1F1B with ``parallel.pp_virtual = v > 1`` virtual stages
(``ScheduleInterleaved1F1B``): the layers are cut into ``pp * v`` chunks and rank ``r``
holds chunks ``r, r + pp, ...``, so the bubble shrinks v-fold for v times the
point-to-point traffic. The zero-bubble schedules split each backward into an input-gradient
pass (what the previous stage waits for) and a weight-gradient pass (which nobody waits
for, so it fills the bubble); ``PipelineStage`` does the split itself
(``stage_backward_input`` / ``stage_backward_weight``):

* ``interleaved-zb``: ``ScheduleInterleavedZeroBubble`` (ZB1P) on the looped chunks of
  interleaved 1F1B (``pp_virtual >= 2``);
* ``zbv``: ``ScheduleZBVZeroBubble``, two chunks per rank in a V (``pp_virtual = 2``; rank
  ``r`` holds chunks ``r`` and ``2 pp - 1 - r``, so rank 0 holds both the embeddings and
  the head);
* ``dualpipev``: ``ScheduleDualPipeV`` in the same V (at least ``2 pp`` micro-batches; a
  ramp-up step with fewer runs ``zbv``, which needs none).

A rank's chunks are gathered, for the optimizer, the checkpoint and clipping, into one
module under the same global names (:class:`StageChunks`).

Tied input/output embeddings across stages (Megatron's approach): the last stage holds its
own copy of the embedding table as ``output.weight``, initialised from the same seed and
so equal to the first stage's ``tok_embeddings.weight``; after every backward the two
gradients are summed over a group of the two ranks (:meth:`PipelineParallel.sync_tied_grads`),
or on the rank itself where a V puts the first and the last stage on one rank, so both
copies see the gradient of the shared weight and stay bitwise equal under the same
optimizer update; the norm for clipping counts the table once. Gradients equal those of
the mean loss over the micro-batches (the schedule scales each micro-batch's gradient by
1 / n_micro).
"""

from __future__ import annotations

import torch
from torch import nn

from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT, embed
from mtnlg.parallel.config import V_SCHEDULES, ParallelConfig
from mtnlg.parallel.cp import chunk_positions
from mtnlg.parallel.loss import cross_entropy, loss_parallel_context
from mtnlg.parallel.parallelize import parallelize_gpt


class GPTStage(nn.Module):
    """A contiguous slice of a ``GPT``: tokens (B, T) on the first stage, hidden states
    (B, T, H) elsewhere -> hidden states (B, T, H), or logits (B, T, V_padded) on the last
    stage. Submodule names are the ``GPT``'s, so state-dict keys are global. With ``cp > 1``
    T is this cp rank's ``seq_length / cp`` positions (``chunk_positions``)."""

    def __init__(self, model: GPT, layers: range, first: bool, last: bool, cp: int = 1, cp_rank: int = 0):
        super().__init__()
        cfg = model.cfg
        self.cfg: ModelConfig = cfg
        self.cp, self.cp_rank = cp, cp_rank  # the context-parallel positions this stage runs
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
        # Training sequences are model.seq_length long. Under sequence parallelism a later
        # stage sees only its chunk (B, T/tp, H) while attention works on the gathered
        # sequence, so the positions come from the config, not from x: all T of them, or
        # with context parallelism this rank's T/cp (chunk_positions), in every stage.
        pos = None
        if self.cp > 1:
            if self.first and x.shape[1] * self.cp != self.cfg.seq_length:
                raise ValueError(f"a context-parallel pipeline runs sequences of model.seq_length="
                                 f"{self.cfg.seq_length}, cut into {self.cp} parts; got {x.shape[1]} tokens "
                                 f"on cp rank {self.cp_rank}")
            pos = chunk_positions(self.cfg.seq_length, self.cp, self.cp_rank, device=x.device)  # (T/cp,)
        if self.first:
            x = embed(self, x, position_ids=pos)                                 # (B, T|T/cp, H)
        rope = self.rope if self.rope is None or pos is None else self.rope[pos]  # (T|T/cp, hd/2, 2)
        for layer in self.layers.values():
            x = layer(x, rope)                                                   # (B, T|T/cp, H)
        if self.last:
            x = self.output(self.norm(x))                                        # (B, T, V_padded)
        return x


def split_stage(model: GPT, layers: range, first: bool, last: bool, cp: int = 1, cp_rank: int = 0) -> GPTStage:
    """This stage's part of ``model`` (shared modules, not copies), run at the positions of
    cp rank ``cp_rank`` of ``cp``."""
    return GPTStage(model, layers, first, last, cp, cp_rank)


def stage_indices(dims, schedule: str, pp_rank: int) -> list[int]:
    """The chunks (of ``pp * virtual_stages``, in layer order) pipeline rank ``pp_rank``
    runs: looped ``r, r + pp, ...``, or in a V ``r, 2 pp - 1 - r`` (``zbv``, ``dualpipev``:
    the activations go down the ranks and back up, so the last chunk is on rank 0)."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * dims.pp - 1 - pp_rank]
    return dims.stage_indices(pp_rank)


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
    mesh of ``ParallelDims.build_mesh`` (``(pp, dp, cp, tp)`` with ``cp > 1``). ``self.model`` is the stage module (or
    :class:`StageChunks` of the rank's virtual stages) to give the optimizer, the
    checkpointer and gradient clipping."""

    def __init__(self, model: GPT, mesh, dims, cfg: ParallelConfig, device: torch.device, param_dtype=None):
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage

        self.pp_rank = dims.pp_rank(mesh)
        self.pp = dims.pp
        self.tp = dims.tp
        self.schedule_name = cfg.pp_schedule
        n_chunks = dims.pp * dims.virtual_stages
        indices = stage_indices(dims, cfg.pp_schedule, self.pp_rank)
        # whether this rank runs the first chunk (embeddings) / the last (head and loss)
        self.first, self.last = 0 in indices, n_chunks - 1 in indices
        self.group = mesh.get_group("pp")
        # the stage's mesh: (dp, tp), or (dp, cp, tp) with context parallelism
        stage_mesh = mesh["dp", "cp", "tp"] if dims.cp > 1 else mesh["dp", "tp"]
        cp_rank = dims.cp_rank(mesh)
        self.chunks: list[GPTStage] = []
        self.stages = []
        for index in indices:
            chunk = split_stage(model, dims.chunk_layers(index), index == 0, index == n_chunks - 1,
                                dims.cp, cp_rank)
            if index == n_chunks - 1 and self.first and model.cfg.tie_embeddings:
                # the first and the last chunk on one rank (a V): the head gets its own copy
                # of the table, as on a last-stage rank, so that each chunk (wrapped for
                # data parallelism on its own) owns its parameters
                chunk.output.weight = nn.Parameter(chunk.output.weight.detach().clone())
            chunk = parallelize_gpt(chunk, stage_mesh, dims, activation_checkpoint=cfg.activation_checkpoint,
                                    compile=cfg.compile, param_dtype=param_dtype)
            self.chunks.append(chunk)
            self.stages.append(PipelineStage(chunk, index, n_chunks, device, group=self.group))
        self.model = self.chunks[0] if len(self.chunks) == 1 else StageChunks(self.chunks)
        self.stage = self.stages[0]
        # Tied embeddings: one group per (dp, tp) position, of its first- and last-stage ranks
        # (every rank takes part in creating every group); none where one rank holds both.
        self.tied_group = None
        self.tied_here = model.cfg.tie_embeddings and self.first and self.last
        if model.cfg.tie_embeddings and cfg.pp_schedule not in V_SCHEDULES:
            me = dist.get_rank()
            for ranks in dims.pp_groups():
                group = dist.new_group([ranks[0], ranks[-1]])
                if me in (ranks[0], ranks[-1]):
                    self.tied_group = group
        self._schedules: dict[int, object] = {}
        self._eval_schedules: dict[int, object] = {}  # the V schedules' forward-only plans

    @property
    def tied_copy(self) -> list[torch.Tensor]:
        """The last stage's copy of the tied table (for clipping's ``duplicates``); looked up
        each time, since materializing a meta model replaces the parameter objects."""
        held = self.tied_group is not None or self.tied_here
        return [self.model.output.weight] if held and self.last else []

    def tied_weight(self) -> torch.Tensor | None:
        """This rank's copy of the tied embedding table, if it holds one (the first stage's
        where it holds both)."""
        if self.tied_group is None and not self.tied_here:
            return None
        return self.model.tok_embeddings.weight if self.first else self.model.output.weight

    def sync_tied_grads(self) -> None:
        """Sum the tied table's gradient over its first- and last-stage copies (collective
        over the two ranks, or local where one rank holds both; a no-op elsewhere)."""
        import torch.distributed as dist

        if self.tied_here:
            first, last = _local_grad(self.model.tok_embeddings.weight), _local_grad(self.model.output.weight)
            total = first + last
            first.copy_(total)
            last.copy_(total)
        elif self.tied_group is not None:
            dist.all_reduce(_local_grad(self.tied_weight()), group=self.tied_group)

    def _schedule(self, n_micro: int):
        """One schedule per micro-batch count (batch-size ramp-up changes it)."""
        if n_micro not in self._schedules:
            cls = schedule_class(self.schedule_name, len(self.stages), self.pp, n_micro)
            stages = self.stages if len(self.stages) > 1 else self.stage
            self._schedules[n_micro] = cls(stages, n_microbatches=n_micro, loss_fn=_stage_loss, scale_grads=True)
        return self._schedules[n_micro]

    def _eval_schedule(self, n_micro: int):
        """The schedule of forward-only runs. A V schedule hands gradients between a rank's
        own two chunks even in ``eval()``, which a stage without backward refuses (torch
        2.13); so evaluation runs ZBV's plan (DualPipeV's placement too) with its
        input- and weight-gradient actions doing nothing."""
        if self.schedule_name not in V_SCHEDULES:
            return self._schedule(n_micro)
        if n_micro not in self._eval_schedules:
            from torch.distributed.pipelining.schedules import (BACKWARD_INPUT, BACKWARD_WEIGHT,
                                                                ScheduleZBVZeroBubble)

            plan = ScheduleZBVZeroBubble(self.stages, n_microbatches=n_micro, loss_fn=_stage_loss, scale_grads=True)
            for kind in (BACKWARD_INPUT, BACKWARD_WEIGHT):
                plan.register_custom_function(kind, _no_backward)
            self._eval_schedules[n_micro] = plan
        return self._eval_schedules[n_micro]

    def _run(self, x: torch.Tensor, y: torch.Tensor, n_micro: int, train: bool) -> torch.Tensor | None:
        run = self._schedule(n_micro).step if train else self._eval_schedule(n_micro).eval
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


def schedule_class(name: str, local_stages: int, pp: int, n_micro: int):
    """The ``torch.distributed.pipelining`` schedule that runs ``parallel.pp_schedule=name``
    with ``local_stages`` chunks per rank and ``n_micro`` micro-batches."""
    from torch.distributed.pipelining import schedules as s

    if name == "interleaved-zb":
        return s.ScheduleInterleavedZeroBubble
    if name == "zbv" or (name == "dualpipev" and n_micro < 2 * pp):
        # DualPipeV needs a micro-batch per stage; ZBV runs any count in the same V
        return s.ScheduleZBVZeroBubble
    if name == "dualpipev":
        return s.ScheduleDualPipeV
    if local_stages > 1:
        return s.ScheduleInterleaved1F1B
    # 1F1B with fewer micro-batches than stages is all fill and drain: GPipe
    return s.Schedule1F1B if name == "1f1b" and n_micro >= pp else s.ScheduleGPipe


def _no_backward(action, ctx) -> None:
    """What a forward-only run does for a backward action of its plan: take the (empty)
    gradient receive the plan posted for it, as the backward would."""
    ctx.schedule_ref.bwd_recv_ops.pop((action.stage_index, action.microbatch_index), None)


def _stage_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The last stage's loss: :func:`cross_entropy`, never a view. Under tensor parallelism
    that is the local view of a replicated DTensor, and the zero-bubble schedules' input
    backward frees the loss's graph with an in-place ``detach_``, which a view refuses."""
    loss = cross_entropy(logits, targets)
    return loss.clone() if loss._is_view() else loss


def _local_grad(w: torch.Tensor) -> torch.Tensor:
    """``w``'s gradient as a plain tensor of this rank's rows (created as zeros if the
    backward left none), laid out as ``w`` is."""
    from torch.distributed.tensor import DTensor

    g = w.grad
    if g is None:
        g = torch.zeros_like(w)
        w.grad = g
    if isinstance(g, DTensor) and tuple(g.placements) != tuple(w.placements):
        # a vocab-parallel lookup's gradient can come back replicated: shard it as the
        # weight is (a local slice), so both copies hold the same rows
        g = g.redistribute(w.device_mesh, w.placements)
        w.grad = g
    return g.to_local() if isinstance(g, DTensor) else g
