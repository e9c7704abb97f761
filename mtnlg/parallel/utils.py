"""Gradient clipping over sharded parameters, and random numbers for dropout.

Dropout and tensor parallelism (Megatron's rule)
------------------------------------------------
Where an activation is *replicated* across a tensor-parallel group (the hidden states
between layers without sequence parallelism), every rank must drop the same elements, or
the replicas drift apart. Where each rank holds a *different slice* (its own attention
heads; its own chunk of the sequence under sequence parallelism), the ranks must draw
*different* masks, or the heads/chunks of one sample would be dropped in lockstep.

mtnlg gets both from one default generator that is seeded identically on every rank
(``set_seed_for_rank``; Megatron likewise seeds data-parallel ranks alike). Dropout in
replicated regions just uses it. Modules that work on a rank's own slice are run inside
``fork_rng_per_tp_rank`` hooks (installed by ``mtnlg.parallel.tensor_parallel``): on
entry the hook draws one number from the default CPU generator (so every rank advances
it identically and stays in step), seeds the CPU and accelerator generators with that
number mixed with the tensor-parallel rank, and on exit restores them. This plays the
part of Megatron's model-parallel RNG tracker, but the forked seed is a function of the
default generator's state, so activation checkpointing, which restores that state before
recomputing, replays the same masks with no tracker state of its own to save.

Compiled blocks (``parallel.compile``) cannot trace generator seeding, so there the
per-rank modules are swapped for counter-based ones (``PerRankDropout``,
``PerRankCoreAttention``): the same placement rules, masks from a hash of two words drawn
from the shared generator, a rank salt and the element index (see below).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from mtnlg.dist import host_side
from mtnlg.model.gpt import CoreAttention

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads rank offsets over the seed space


def set_seed_for_rank(seed: int, pp_rank: int = 0) -> int:
    """Seed Python, NumPy and torch (CPU and accelerators) for this rank; returns the seed.

    The same on every tensor- and data-parallel rank (offset only by pipeline stage, as
    Megatron does), which also makes model initialisation identical everywhere. Ranks
    that must differ get their own stream from ``fork_rng_per_tp_rank``."""
    s = seed + 100 * pp_rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


def _dropout_active(module: nn.Module) -> bool:
    p = getattr(module, "p", getattr(module, "dropout", 0.0))
    return module.training and isinstance(p, float) and p > 0.0


class _PerRankRNG:
    """Forward pre/post hooks that run a module under a per-rank generator state."""

    def __init__(self, tp_rank: int):
        self.tp_rank = tp_rank
        self._stack: list = []

    def pre(self, module: nn.Module, args) -> None:
        if not _dropout_active(module):
            self._stack.append(None)
            return
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        with host_side():  # a draw from the CPU generator: no device is waited for
            base = int(torch.randint(0, 2**62, (1,)).item())  # same draw on every rank
        accel = device.type != "cpu"
        index = device.index
        if accel and index is None:
            index = torch.get_device_module(device.type).current_device()
        ctx = torch.random.fork_rng(devices=[index] if accel else [],
                                    device_type=device.type if accel else "cuda")
        ctx.__enter__()
        seed = (base + (self.tp_rank + 1) * _GOLDEN) % 2**63
        torch.random.default_generator.manual_seed(seed)
        if accel:
            torch.get_device_module(device.type).manual_seed(seed)
        self._stack.append(ctx)

    def post(self, module: nn.Module, args, output) -> None:
        ctx = self._stack.pop()
        if ctx is not None:
            ctx.__exit__(None, None, None)


def fork_rng_per_tp_rank(module: nn.Module, tp_rank: int) -> None:
    """Make ``module``'s random draws (dropout) differ across tensor-parallel ranks."""
    hooks = _PerRankRNG(tp_rank)
    module.register_forward_pre_hook(hooks.pre)
    module.register_forward_hook(hooks.post, always_call=True)


# ---- counter-based masks: per-rank dropout that torch.compile traces whole ---------------
#
# The fork hooks above seed generators inside the forward, which Dynamo cannot trace (each
# seeding is a graph break, each new seed value a recompile). The compiled path draws no
# per-rank generator state at all: a module draws two 31-bit words from the default
# generator (identical on every rank, and restored by activation checkpointing before a
# recomputation, so the replay draws them again), adds a rank-dependent salt, and hashes
# (salted words, element index) into the keep mask. Every op is an ordinary tensor op, so
# the whole block is one graph; inductor fuses index, hash, compare and scale into one
# kernel, and its partitioner saves only the two words for the backward.

_M32 = 0xFFFFFFFF
_SALT = 0x9E3779B9  # 32-bit golden ratio: spreads rank salts over the word space
# multipliers below 2**31, so every product of a 32-bit value fits in int64 (no overflow)
_MUL = (0x7FEB352D, 0x31848BAB, 0x2C1B3C6D)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """xorshift-multiply avalanche of 32-bit values held in int64."""
    for m in _MUL:
        x = x ^ (x >> 16)
        x = (x * m) & _M32
    return x ^ (x >> 16)


def counter_keep_mask(shape: torch.Size, p: float, salt: int, device) -> torch.Tensor:
    """A boolean mask of ``shape``, True with probability ``1 - p`` (to 2**-24), from two
    draws of the default generator and ``salt``: the same on ranks with the same salt."""
    words = torch.randint(0, 2**31, (2,), device=device)  # same draw on every rank
    s0 = (words[0] + salt * _SALT) & _M32
    s1 = (words[1] + (salt + 1) * _SALT) & _M32
    n = 1
    for d in shape:
        n *= d
    idx = torch.arange(n, device=device, dtype=torch.int64).view(shape)
    h = _mix32(_mix32((idx & _M32) ^ s0) ^ (idx >> 32) ^ s1)
    return (h >> 8) >= round(p * 2**24)


def counter_dropout(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    """Inverted dropout with a counter-based mask (``counter_keep_mask``)."""
    keep = counter_keep_mask(x.shape, p, salt, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class PerRankDropout(nn.Module):
    """``nn.Dropout`` whose mask differs across tensor-parallel ranks (sequence-parallel
    hidden states: each rank holds another chunk of the sequence), compile-friendly."""

    def __init__(self, p: float, tp_rank: int):
        super().__init__()
        self.p, self.tp_rank = p, tp_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return counter_dropout(x, self.p, self.tp_rank + 1)

    def extra_repr(self) -> str:
        return f"p={self.p}, tp_rank={self.tp_rank}"


class PerRankCoreAttention(CoreAttention):
    """The model's attention core, whose training-time dropout on the probabilities
    differs across tensor-parallel ranks (each holds other heads) with a counter-based
    mask: softmax(q k^T / sqrt(hd) + causal) * keep / (1 - p) @ v. The probabilities are
    formed explicitly, as in Megatron's core attention (a fused kernel would draw from the
    device generator, which is the same on every rank); eval mode and p = 0 run the
    model's own fused path."""

    def __init__(self, dropout: float, tp_rank: int):
        super().__init__(dropout)
        self.tp_rank = tp_rank

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        B, T, nh, hd = q.shape
        if p == 0.0 or pad is not None or k.shape[1] != T:
            return super().forward(q, k, v, pad)  # no dropout, or not a training shape
        n_rep = nh // k.shape[2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # (B, nh, T, hd)
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        scores = (q @ k.transpose(-2, -1)).float() * (hd ** -0.5)             # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        probs = counter_dropout(probs, p, self.tp_rank + 1).to(v.dtype)
        y = probs @ v                                                           # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, T, nh * hd)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, tp_rank={self.tp_rank}, counter-based mask"


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0, pp_group=None, duplicates: Iterable[torch.Tensor] = ()) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm
    before clipping as a 0-d float32 tensor (``inf``/``nan`` if a gradient is not finite,
    in which case nothing is scaled). Nothing is read back to the host: the scale is a
    device tensor, so a step that does not log never waits for the device here.

    Works for plain tensors and DTensors (tensor parallel, FSDP2, both on a 2-D mesh):
    each rank sums the squares of its local shard, then the partial sums are all-reduced
    only over the mesh dimensions along which that parameter is sharded, so replicated
    copies are counted once. ``max_norm <= 0`` only measures. Under pipeline parallelism
    pass the ``pp_group``: each stage holds different parameters, so the stages' squared
    norms are summed over it (every stage must call, even one without gradients).
    ``duplicates`` are parameters held twice in the world (the last stage's copy of tied
    embeddings): scaled with the rest but not counted in the norm a second time."""
    from torch.distributed.tensor import DTensor, Replicate

    if norm_type != 2.0:
        raise ValueError(f"only the 2-norm is supported, got norm_type={norm_type}")
    dup_ids = {id(p) for p in duplicates}
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None and id(p) not in dup_ids]
    extra = [p.grad for p in params if p.grad is not None and id(p) in dup_ids]
    if not grads and not extra and pp_group is None:
        return torch.zeros((), dtype=torch.float32)
    # (mesh, sharded mesh dims) -> local tensors; key None = plain tensors
    buckets: dict = defaultdict(list)
    locals_: list[torch.Tensor] = []
    partial_grads: list[torch.Tensor] = []  # pending reductions: scaled as DTensors
    for g in grads:
        if isinstance(g, DTensor):
            if any(p.is_partial() for p in g.placements):
                partial_grads.append(g)
                g = g.redistribute(g.device_mesh,
                                   [Replicate() if p.is_partial() else p for p in g.placements])
            else:
                locals_.append(g.to_local())  # a view: scaling it scales the gradient
            # Shard or _StridedShard (FSDP2 on top of TP): anything not replicated by now
            sharded = tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())
            buckets[(g.device_mesh, sharded) if sharded else None].append(g.to_local())
        else:
            locals_.append(g)
            buckets[None].append(g)
    total_sq = None
    for key, tensors in buckets.items():
        norms = torch._foreach_norm(tensors, 2.0)
        sq = torch.stack([n.float() for n in norms]).pow(2).sum()
        if key is not None:
            mesh, dims = key
            for d in dims:
                torch.distributed.all_reduce(sq, group=mesh.get_group(d))
        total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
    if pp_group is not None:
        if total_sq is None:
            total_sq = torch.zeros((), dtype=torch.float32)
        torch.distributed.all_reduce(total_sq, group=pp_group)
    if total_sq is None:
        total_sq = torch.zeros((), dtype=torch.float32)
    total = total_sq.sqrt()
    for g in extra:  # scaled, not counted
        if isinstance(g, DTensor) and any(p.is_partial() for p in g.placements):
            partial_grads.append(g)
        else:
            locals_.append(g.to_local() if isinstance(g, DTensor) else g)
    if max_norm > 0:
        # min(1, max_norm / norm), and 1 (nothing scaled) when the norm is not finite
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
        by_device: dict = defaultdict(list)
        for t in locals_:
            by_device[(t.device, t.dtype)].append(t)
        for (device, dtype), ts in by_device.items():
            torch._foreach_mul_(ts, coef.to(device=device, dtype=dtype))
        for g in partial_grads:  # a pending sum scales term by term
            g.to_local().mul_(coef.to(device=g.device, dtype=g.dtype))
    return total


def set_requires_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn the data-parallel gradient all-reduce / reduce-scatter off for the micro-batches
    of a gradient-accumulation step and back on for the last one (no-op without DP)."""
    fn = getattr(model, "set_requires_gradient_sync", None)
    if callable(fn):
        fn(enabled)
