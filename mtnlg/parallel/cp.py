"""Context parallelism: each sequence is split over the ``"cp"`` ranks, so one rank's
attention activations (and every other activation) cover ``T / cp`` positions.

Load-balanced causal sharding. The sequence is cut into ``2 * cp`` equal chunks; rank ``r``
holds chunks ``r`` and ``2 * cp - 1 - r``. Under a causal mask a late chunk attends to more
keys than an early one, so pairing the ``r``-th earliest with the ``r``-th latest gives every
rank the same attention work. 8 positions, cp = 2 (chunks of 2)::

    positions  0 1 | 2 3 | 4 5 | 6 7
    chunk        0     1     2     3
    rank 0 holds chunks 0, 3: positions [0, 1, 6, 7]
    rank 1 holds chunks 1, 2: positions [2, 3, 4, 5]

Tokens, targets and positions are sharded the same way (``shard_sequence``,
``chunk_positions``); the model takes the positions (``GPT.forward(..., position_ids=)``) so
rotary angles and learned/sinusoidal positions are those of the global positions.

Attention (all-gather form, exact; runs on CPU/gloo and on GPU/NCCL alike). Every rank keeps
its queries and all-gathers the keys and values of the whole sequence over the cp group
(``all_gather_single_autograd``: forward all-gather, backward reduce-scatter of the key and
value gradients, each rank's share summed over the queries of every rank), then attends with
the causal mask of the global positions (query at position p sees keys at positions <= p).
Memory: K and V of the whole sequence for one layer at a time, (B, T, nkv, hd) each, while
every other activation is ``T / cp``; with grouped-query attention K and V are small.

PyTorch's own ring attention (``torch.distributed.tensor.experimental.context_parallel``)
is not used: in torch 2.13 it intercepts only the CUDA flash / memory-efficient / cuDNN SDPA
kernels; on CPU, SDPA lowers to ``aten._scaled_dot_product_flash_attention_for_cpu``, which
has neither a ring handler nor a DTensor sharding strategy (``NotImplementedError: Operator
aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy
registered``), so it cannot be tested against the single process here.

The loss: each rank's mean cross entropy is over its own ``T / cp`` targets (every rank
holds the same number, and training ignores none), so the average over the cp ranks is the
mean over the whole sequence. Gradients are averaged over the cp ranks together with the
data-parallel ones (DDP / FSDP2 on the flattened ``("dp", "cp")`` mesh, ``dp_cp_mesh``,
as torchtitan does), which makes them the gradients of that mean.

``mtnlg.parallel.parallelize.parallelize_gpt`` applies all of this for a ``cp > 1`` layout,
first in its order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.model.gpt import CoreAttention


def chunk_positions(seq_length: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by ``cp_rank``: chunks ``cp_rank`` and ``2*cp-1-cp_rank`` of
    ``2 * cp`` equal chunks, in that order. Returns (seq_length / cp,) int64."""
    if seq_length % (2 * cp):
        raise ValueError(f"sequence length {seq_length} is not divisible by 2 * cp = {2 * cp}")
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp rank {cp_rank} is outside 0 .. {cp - 1}")
    c = seq_length // (2 * cp)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    last = torch.arange((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c, device=device)
    return torch.cat([first, last])                                              # (T/cp,)


def shard_sequence(x: torch.Tensor, cp: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's positions of ``x`` along ``dim`` (tokens or targets (B, T) -> (B, T/cp))."""
    idx = chunk_positions(x.shape[dim], cp, cp_rank, device=x.device)
    return x.index_select(dim, idx)


def unshard_sequence(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The inverse of ``shard_sequence`` given every rank's part, in rank order (tests,
    gathering logits): (B, T/cp, ...) x cp -> (B, T, ...)."""
    cp = len(parts)
    T = parts[0].shape[dim] * cp
    order = torch.cat([chunk_positions(T, cp, r) for r in range(cp)])            # (T,)
    gathered = torch.cat(parts, dim=dim)
    return gathered.index_select(dim, torch.argsort(order).to(gathered.device))


class ContextParallelCoreAttention(CoreAttention):
    """The attention core on a rank's ``T / cp`` queries against all ``T`` keys and values,
    gathered over the cp group; the causal mask follows the global positions of both.
    Eval and training alike; the dropout on the probabilities is SDPA's (drawn from the
    default generator, like the model's own core)."""

    def __init__(self, dropout: float, cp_group, cp: int, cp_rank: int):
        super().__init__(dropout)
        self.cp_group, self.cp, self.cp_rank = cp_group, cp, cp_rank

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_gather_single_autograd

        if pad is not None or k.shape[1] != q.shape[1]:
            raise ValueError("context-parallel attention runs whole training sequences; "
                             "generation with a KV cache runs on the unsharded model")
        B, Tl, nh, hd = q.shape
        T = Tl * self.cp
        # gather along the sequence: all_gather_single_autograd concatenates along dim 0
        k = all_gather_single_autograd(k.transpose(0, 1).contiguous(), 0, self.cp_group)  # (T, B, nkv, hd)
        v = all_gather_single_autograd(v.transpose(0, 1).contiguous(), 0, self.cp_group)
        k, v = k.transpose(0, 1), v.transpose(0, 1)                              # (B, T, nkv, hd), rank order
        qpos = chunk_positions(T, self.cp, self.cp_rank, device=q.device)       # (Tl,)
        kpos = torch.cat([chunk_positions(T, self.cp, r, device=q.device) for r in range(self.cp)])  # (T,)
        mask = kpos[None, :] <= qpos[:, None]                                    # (Tl, T)
        n_rep = nh // k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)        # (B, n, Tl|T, hd)
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)                                # (B, nh, T, hd)
            v = v.repeat_interleave(n_rep, dim=1)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, Tl, hd)
        return y.transpose(1, 2).reshape(B, Tl, nh * hd)                         # (B, Tl, nh*hd)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, cp={self.cp}, cp_rank={self.cp_rank}, all-gather K/V"


def apply_context_parallel(model: nn.Module, cp_mesh) -> nn.Module:
    """Swap every block's ``attention.core_attention`` of ``model`` (a ``GPT`` or a pipeline
    stage) for ``ContextParallelCoreAttention`` over the 1-D ``cp_mesh``, in place. Apply it
    before tensor parallelism, whose per-rank dropout hooks land on the core it finds."""
    cp, cp_rank, group = cp_mesh.size(), cp_mesh.get_local_rank(), cp_mesh.get_group()
    if cp == 1:
        return model
    for block in model.layers.children():
        core = block.attention.core_attention
        if type(core) is not CoreAttention:
            raise ValueError(f"apply_context_parallel expects the model's own CoreAttention, found "
                             f"{type(core).__name__}; apply it before tensor parallelism and "
                             f"activation checkpointing")
        new = ContextParallelCoreAttention(core.dropout, group, cp, cp_rank)
        new.train(core.training)
        block.attention.core_attention = new
    return model


def dp_cp_mesh(mesh):
    """The mesh over which gradients are averaged: ``mesh["dp", "cp"]`` flattened into one
    dimension named ``"dp_cp"`` (every rank with the same pp and tp coordinates)."""
    names = tuple(mesh.mesh_dim_names or ())
    if "cp" not in names:
        return mesh["dp"]
    return mesh["dp", "cp"]._flatten("dp_cp")
