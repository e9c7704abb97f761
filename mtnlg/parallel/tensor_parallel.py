"""Tensor (and sequence) parallelism for ``mtnlg.model.gpt.GPT``, as a plan keyed by
submodule name and applied with DTensor's ``parallelize_module``.

Megatron's split, per transformer layer (tp ranks, each holding 1/tp of every matmul):

* attention ``wq``/``wk``/``wv`` and MLP ``w_up``/``w_gate``: column-parallel (output
  features sharded), so each rank computes its own attention heads / FFN columns with no
  communication;
* attention ``wo`` and MLP ``w_down``: row-parallel (input features sharded); their partial
  sums are all-reduced (or reduce-scattered, with sequence parallelism);
* ``tok_embeddings``: vocabulary-parallel (each rank holds V/tp rows, looks up the ids in
  its range, the partial embeddings are summed);
* ``output`` head: column-parallel over the vocabulary, logits left sharded
  (``Shard(-1)`` DTensor) for the vocab-parallel cross-entropy in
  ``mtnlg.parallel.loss``. A tied head shares the embedding's ``Shard(0)`` weight.

Everything else (norms, learned position table) is replicated: the parameters become
``Replicate()`` DTensors, so after this step every parameter is a DTensor on the
tensor-parallel mesh and optimizers, clipping and checkpoints treat them uniformly.

With ``sequence_parallel`` the activations between the matmul pairs (norms, dropout,
residual adds) are split over the sequence dimension instead of replicated (Korthikanti
et al., 2022): the all-reduce after each row-parallel layer becomes a reduce-scatter and
an all-gather before the next column-parallel one, same traffic, 1/tp of the activation
memory. Positions under SP: rotary angles are applied inside attention, which sees the
whole gathered sequence; additive positions (learned, sinusoidal) are added to the
replicated embedding output, which is then split over the sequence at ``drop`` (a local
slice, no communication), as Megatron does when it has learned positions.

The model reads head counts from its projections' local output sizes, so no attribute
needs adjusting after sharding.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import CoreAttention
from mtnlg.parallel.utils import PerRankCoreAttention, PerRankDropout, fork_rng_per_tp_rank


class ReplicateParallel(ParallelStyle):
    """Replicated computation on plain-tensor activations: parameters become ``Replicate()``
    DTensors (broadcast from the group's first rank), inputs are wrapped as replicated
    DTensors and outputs unwrapped. Gradients come out identical on every rank, so neither
    direction needs communication."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._inputs, self._outputs)

    @staticmethod
    def _partition(name: str, module: nn.Module, mesh) -> None:
        for pname, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(
                distribute_tensor(p, mesh, [Replicate()]), requires_grad=p.requires_grad))

    @staticmethod
    def _inputs(module: nn.Module, args: tuple, mesh) -> tuple:
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                     if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a
                     for a in args)

    @staticmethod
    def _outputs(module: nn.Module, out, mesh):
        return out.to_local() if isinstance(out, DTensor) else out

    def __repr__(self) -> str:
        return "ReplicateParallel()"


def tensor_parallel_plan(cfg: ModelConfig, sequence_parallel: bool) -> dict[str, Any]:
    """The TP plan: ``{submodule name pattern: ParallelStyle}`` (``*`` = any layer index)."""
    Colwise, Rowwise, PrepareInput = ColwiseParallel, RowwiseParallel, PrepareModuleInput
    sp = sequence_parallel
    additive_positions = cfg.position in ("learned", "sinusoidal")
    L = "layers.*."
    plan: dict[str, Any] = {}

    # embeddings: vocab-parallel lookup; the sum over ranks is all-reduced, or, with SP
    # and nothing to add afterwards, reduce-scattered straight onto the sequence shards
    emb_out = Shard(1) if sp and not additive_positions else Replicate()
    plan["tok_embeddings"] = Rowwise(input_layouts=Replicate(), output_layouts=emb_out)
    if cfg.position == "learned":
        plan["pos_embeddings"] = ReplicateParallel()
    if sp and additive_positions:
        plan["drop"] = PrepareInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                    use_local_output=True)

    norm = SequenceParallel() if sp else ReplicateParallel()
    # block input: sequence shards (SP) are all-gathered before the column-parallel matmuls
    block_in = (PrepareInput(input_layouts=(Shard(1), None),
                             desired_input_layouts=(Replicate(), None),
                             use_local_output=True) if sp else None)
    mlp_in = (PrepareInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                           use_local_output=True) if sp else None)
    row_out = Shard(1) if sp else Replicate()

    plan[L + "attention_norm"] = norm
    if block_in is not None:
        plan[L + "attention"] = block_in
    plan[L + "attention.wq"] = Colwise()
    plan[L + "attention.wk"] = Colwise()
    plan[L + "attention.wv"] = Colwise()
    plan[L + "attention.wo"] = Rowwise(output_layouts=row_out)
    plan[L + "mlp_norm"] = norm
    if mlp_in is not None:
        plan[L + "mlp"] = mlp_in
    plan[L + "mlp.w_up"] = Colwise()
    if cfg.activation == "swiglu":
        plan[L + "mlp.w_gate"] = Colwise()
    plan[L + "mlp.w_down"] = Rowwise(output_layouts=row_out)

    plan["norm"] = norm
    plan["output"] = Colwise(input_layouts=Shard(1) if sp else Replicate(),
                             output_layouts=Shard(-1), use_local_output=False)
    return plan


def per_rank_dropout_modules(cfg: ModelConfig, sequence_parallel: bool) -> list[str]:
    """Name patterns of the modules whose dropout must differ across TP ranks: the
    attention core always (each rank holds different heads); the hidden-state dropouts
    only with SP (each rank holds a different chunk of the sequence)."""
    names = ["layers.*.attention.core_attention"]
    if sequence_parallel:
        names += ["drop", "layers.*.attention.dropout", "layers.*.mlp.dropout"]
    return names


def _matching_named(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if fnmatch(name, pattern)
            and name.count(".") == pattern.count(".")]


def _matching_modules(model: nn.Module, pattern: str) -> list[nn.Module]:
    return [m for _, m in _matching_named(model, pattern)]


def _swap_per_rank_dropouts(model: nn.Module, patterns: list[str], tp_rank: int) -> None:
    for pattern in patterns:
        for name, module in _matching_named(model, pattern):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(module, CoreAttention):
                new = PerRankCoreAttention(module.dropout, tp_rank)
            else:
                new = PerRankDropout(module.p, tp_rank)
            new.train(module.training)
            setattr(parent, attr, new)


def _check_vocab_padding(vocab_size_padded: int, tp: int) -> None:
    """The model must have been built for this degree: the config's sizes were checked by
    ``ParallelDims.build``, but only the instance knows the padding it was built with."""
    if vocab_size_padded % tp:
        raise ValueError(f"padded vocabulary={vocab_size_padded} is not divisible by the tensor-parallel degree "
                         f"{tp}; build the model as GPT(cfg, tp={tp}) so the vocabulary is padded for it")


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool,
                          rng: str = "fork") -> nn.Module:
    """Shard ``model`` (a ``GPT`` or a pipeline ``GPTStage``) in place over the 1-D
    ``tp_mesh``; plan entries naming modules the model lacks are skipped.

    ``rng`` says how the dropouts that must differ across ranks get their masks:
    ``"fork"`` (eager) runs those modules under a per-rank generator (the attention core
    keeps its fused kernel); ``"counter"`` (for ``torch.compile``) swaps them for
    counter-based versions that touch no generator state, so a block traces as one graph
    with no recompiles (``mtnlg.parallel.utils``)."""
    if rng not in ("fork", "counter"):
        raise ValueError(f"rng must be 'fork' or 'counter', got {rng!r}")
    cfg: ModelConfig = model.cfg
    tp = tp_mesh.size()
    _check_vocab_padding(model.vocab_size_padded, tp)
    plan = tensor_parallel_plan(cfg, sequence_parallel)
    # a pipeline stage lacks some modules (embeddings, head, other stages' layers)
    plan = {k: v for k, v in plan.items() if _matching_modules(model, k)}
    if rng == "counter":  # before the plan, whose input hooks land on the new modules
        _swap_per_rank_dropouts(model, per_rank_dropout_modules(cfg, sequence_parallel),
                                tp_mesh.get_local_rank())
    parallelize_module(model, tp_mesh, plan)
    if cfg.tie_embeddings and hasattr(model, "output") and hasattr(model, "tok_embeddings"):
        # parallelize_module gave the head its own copy of the shared weight; share again
        # (both are Shard(0) over the vocabulary, so the layouts agree; a pipeline's last
        # stage keeps its own copy, kept in step by PipelineParallel.sync_tied_grads)
        model.output.weight = model.tok_embeddings.weight
    if rng == "fork":
        tp_rank = tp_mesh.get_local_rank()
        for pattern in per_rank_dropout_modules(cfg, sequence_parallel):
            for module in _matching_modules(model, pattern):
                fork_rng_per_tp_rank(module, tp_rank)
    return model
