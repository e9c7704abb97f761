"""A decoder-only GPT, written for one device.

Read top to bottom: positions -> attention -> MLP -> block -> GPT. The file holds no
collectives and no parallel code; ``mtnlg.parallel`` shards it from the outside by
submodule name, so the names below are an interface (checkpoints, tensor-parallel plans,
fuse/export all key on them)::

    tok_embeddings.weight                     (V_padded, H)
    pos_embeddings.weight                     (T, H)           position == "learned"
    layers.{i}.attention_norm.weight / .bias  (H,)             bias only for LayerNorm
    layers.{i}.attention.wq.weight / .bias    (nh * hd, H)
    layers.{i}.attention.wk.weight / .bias    (nkv * hd, H)
    layers.{i}.attention.wv.weight / .bias    (nkv * hd, H)
    layers.{i}.attention.wo.weight / .bias    (H, nh * hd)
    layers.{i}.mlp_norm.weight / .bias        (H,)
    layers.{i}.mlp.w_up.weight / .bias        (F, H)
    layers.{i}.mlp.w_gate.weight / .bias      (F, H)           activation == "swiglu"
    layers.{i}.mlp.w_down.weight / .bias      (H, F)
    norm.weight / .bias                       (H,)
    output.weight                             (V_padded, H)    same tensor as
                                                               tok_embeddings.weight if tied

Linear biases exist only when ``cfg.bias``. For generation, ``KVCache`` keeps each
layer's keys and values so that ``model(next_tokens, cache=cache)`` runs only new positions. Buffers (not saved in state dicts):
``pos_table`` (T, H) for sinusoidal positions, ``rope`` (T, hd/2, 2) for rotary ones.

Shapes: B batch, T sequence, H hidden, nh query heads, nkv key/value heads, hd head size,
F feed-forward width, V_padded vocabulary padded for tensor parallelism.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from mtnlg.model.config import ModelConfig

# ---------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------


def sinusoidal_table(seq_length: int, hidden_size: int) -> torch.Tensor:
    """Fixed positions of "Attention is all you need": PE[p, 2i] = sin(p / 10000^(2i/H)),
    PE[p, 2i+1] = cos(p / 10000^(2i/H)).  Returns (T, H)."""
    pos = torch.arange(seq_length, dtype=torch.float32)[:, None]                # (T, 1)
    inv = torch.exp(torch.arange(0, hidden_size, 2, dtype=torch.float32)
                    * (-math.log(10000.0) / hidden_size))                        # (H/2,)
    table = torch.zeros(seq_length, hidden_size)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)
    return table                                                                 # (T, H)


def rope_table(seq_length: int, head_dim: int, theta: float) -> torch.Tensor:
    """cos/sin of the rotary angles p * theta^(-2i/hd).  Returns (T, hd/2, 2)."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.arange(seq_length, dtype=torch.float32)[:, None] * inv           # (T, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)                        # (T, hd/2, 2)


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each head's two halves (x1, x2) by the position's angle (the GPT-NeoX /
    Hugging Face Llama layout, so exported weights need no permutation).
    x: (B, T, n, hd), rope: (T, hd/2, 2), or (B, T, hd/2, 2) when each sequence has
    positions of its own (a left-padded batch) -> (B, T, n, hd)."""
    half = x.shape[-1] // 2
    if rope.dim() == 3:
        rope = rope[None]                                                        # (1, T, hd/2, 2)
    cos = rope[:, :, None, :, 0].to(x.dtype)                                     # (B|1, T, 1, hd/2)
    sin = rope[:, :, None, :, 1].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]                                        # (B, T, n, hd/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias)


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(hd) + causal mask) v with dropout on the probabilities.

    A module of its own (no parameters) so that parallel code can treat the part that
    works on sharded heads separately: its dropout must differ across tensor-parallel
    ranks, and "selective" activation checkpointing recomputes just this part.
    """

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        # q: (B, T, nh, hd); k, v: (B, S, nkv, hd) with S = T, or S > T when the keys
        # include cached earlier positions (the T queries are then the last T positions).
        # pad (B,): the first pad[b] key slots of sequence b are left padding, never read
        # (a padding query reads only itself, so no row of the softmax is empty).
        B, T, nh, hd = q.shape
        S = k.shape[1]
        n_rep = nh // k.shape[2]
        q = q.transpose(1, 2)                                                    # (B, nh, T, hd)
        k = k.transpose(1, 2)                                                    # (B, nkv, S, hd)
        v = v.transpose(1, 2)
        if n_rep > 1:
            # grouped-query attention: query head j reads key/value head j // n_rep
            k = k.repeat_interleave(n_rep, dim=1)                                # (B, nh, S, hd)
            v = v.repeat_interleave(n_rep, dim=1)
        p = self.dropout if self.training else 0.0
        if pad is not None:
            slots = torch.arange(S, device=q.device)                             # (S,)
            qslot = slots[S - T:, None]                                          # (T, 1)
            causal = slots[None, :] <= qslot                                     # (T, S)
            real = slots[None, None, :] >= pad[:, None, None]                    # (B, 1, S)
            mask = causal[None] & (real | (slots[None, :] == qslot)[None])       # (B, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=p)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:  # query i sits at position S - T + i and sees keys 0 .. S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return y.transpose(1, 2).reshape(B, T, nh * hd)                          # (B, T, nh*hd)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


class Attention(nn.Module):
    """Causal self-attention with separate q/k/v projections.

    Head counts are read from the projections' outputs at run time (``view(B, T, -1, hd)``),
    so the same code runs unchanged when tensor parallelism leaves each rank with
    nh / tp query heads and nkv / tp key/value heads.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(H, cfg.num_heads * hd, bias=cfg.bias)
        self.wk = nn.Linear(H, cfg.kv_heads * hd, bias=cfg.bias)
        self.wv = nn.Linear(H, cfg.kv_heads * hd, bias=cfg.bias)
        self.core_attention = CoreAttention(cfg.attention_dropout)
        self.wo = nn.Linear(cfg.num_heads * hd, H, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)                             # (B, T, nh, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)                             # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)                             # (B, T, nkv, hd)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        pad = None
        if cache is not None:
            k, v = cache.append(k, v)                                            # (B, S, nkv, hd)
            pad = cache.cache.pad
        y = self.core_attention(q, k, v) if pad is None else self.core_attention(q, k, v, pad)  # (B, T, nh*hd)
        return self.dropout(self.wo(y))                                          # (B, T, H)


# ---------------------------------------------------------------------------------------
# MLP and block
# ---------------------------------------------------------------------------------------


class MLP(nn.Module):
    """GeLU: w_down(gelu(w_up x)).  SwiGLU: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Fs = cfg.hidden_size, cfg.ffn_size
        self.swiglu = cfg.activation == "swiglu"
        self.w_up = nn.Linear(H, Fs, bias=cfg.bias)
        if self.swiglu:
            self.w_gate = nn.Linear(H, Fs, bias=cfg.bias)
        self.w_down = nn.Linear(Fs, H, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.w_gate(x)) * self.w_up(x)                            # (B, T, F)
        else:
            h = F.gelu(self.w_up(x))                                             # (B, T, F)
        return self.dropout(self.w_down(h))                                      # (B, T, H)


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache=cache)        # (B, T, H)
        return x + self.mlp(self.mlp_norm(x))                                    # (B, T, H)


# ---------------------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------------------


def positions(start: int, T: int, pad: torch.Tensor | None, device) -> torch.Tensor:
    """Positions of slots start .. start+T-1: (T,), or (B, T) for a left-padded batch, whose
    sequence b starts at slot pad[b] (padding slots get position 0)."""
    pos = torch.arange(start, start + T, device=device)                          # (T,)
    if pad is None:
        return pos
    return (pos[None, :] - pad[:, None]).clamp(min=0)                            # (B, T)


def embed(module: nn.Module, tokens: torch.Tensor, start: int = 0,
          pad: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Token (+ position) embeddings and dropout: tokens (B, T) at slots start.. ->
    (B, T, H); ``pad`` as in :func:`positions`; ``position_ids`` (T,), when given, are the
    tokens' positions instead (context parallelism: a rank holds non-adjacent chunks).
    ``module`` is a ``GPT`` or a first pipeline stage: anything holding the GPT's ``cfg``,
    ``tok_embeddings``, ``pos_embeddings`` (learned), ``pos_table`` (sinusoidal) and
    ``drop`` under those names."""
    cfg = module.cfg
    T = tokens.shape[1]
    pos = positions(start, T, pad, tokens.device) if position_ids is None else position_ids  # (T | B,T)
    x = module.tok_embeddings(tokens)                                            # (B, T, H)
    if cfg.position == "learned":
        x = x + module.pos_embeddings(pos)                                       # (B, T, H)
    elif cfg.position == "sinusoidal":
        x = x + module.pos_table[pos].to(x.dtype)                                # (B, T, H)
    return module.drop(x)


_RESIDUAL_OUT = ("wo", "w_down")


@torch.no_grad()
def init_position_buffers(module: nn.Module, cfg: ModelConfig) -> None:
    """Fill ``module``'s ``pos_table`` / ``rope`` buffers (a ``GPT`` or a pipeline stage),
    where it has them: after ``to_empty`` they hold garbage."""
    T, H = cfg.seq_length, cfg.hidden_size
    if getattr(module, "pos_table", None) is not None:
        module.pos_table.copy_(sinusoidal_table(T, H))
    if getattr(module, "rope", None) is not None:
        module.rope.copy_(rope_table(T, cfg.head_dim, cfg.rope_theta))


def parameter_seed(seed: int, name: str) -> int:
    """The seed of parameter ``name``'s own generator: a function of the run's seed and the
    parameter's global name only, so its initial value does not depend on the layout, on
    which rank builds it, or on what was drawn before."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def initial_value(cfg: ModelConfig, name: str, shape, seed: int, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole initial tensor of parameter ``name`` (a global name such as
    ``layers.3.attention.wo.weight``), drawn from its own generator (:func:`parameter_seed`)
    with Megatron's initialisation (see :meth:`GPT.init_weights`). A tied head's copy is the
    embedding's value."""
    if cfg.tie_embeddings and name == "output.weight":
        name = "tok_embeddings.weight"
    module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    kind = module.rsplit(".", 1)[-1]
    if kind.endswith("norm"):
        return torch.full(tuple(shape), 1.0 if leaf == "weight" else 0.0, dtype=dtype, device=device)
    if leaf == "bias":
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers) if kind in _RESIDUAL_OUT else cfg.init_std
    device = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator(device=device)
    g.manual_seed(parameter_seed(seed, name))
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return out.normal_(0.0, std, generator=g)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's weight-decay split: biases and 1-D parameters (norm weights) are not
    decayed; shapes are global under DTensor."""
    return name.endswith(".bias") or name == "bias" or param.ndim < 2


def weight_decay_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters to decay and not to decay, in ``named_parameters``
    order: AdamW's two groups as ``train.optim`` builds them (empty ones dropped) and as a
    checkpoint's grouped optimizer state lists them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(name)
    return decay, no_decay


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V_padded).

    ``tp`` only sets the vocabulary padding (``cfg.padded_vocab_size(tp)``); the module is
    always built whole, on one device, and sharded afterwards. Logits of the padding ids
    (>= ``cfg.vocab_size``) are part of the softmax, as in Megatron; they are never
    targets, so training pushes them down. Under tensor parallelism ``forward`` returns a
    DTensor sharded over the vocabulary (``.full_tensor()`` gathers it).
    """

    def __init__(self, cfg: ModelConfig, tp: int = 1):
        super().__init__()
        self.cfg = cfg
        self.vocab_size_padded = cfg.padded_vocab_size(tp)
        H, T = cfg.hidden_size, cfg.seq_length
        self.tok_embeddings = nn.Embedding(self.vocab_size_padded, H)
        if cfg.position == "learned":
            self.pos_embeddings = nn.Embedding(T, H)
        self.register_buffer("pos_table", sinusoidal_table(T, H) if cfg.position == "sinusoidal"
                             else None, persistent=False)
        self.register_buffer("rope", rope_table(T, cfg.head_dim, cfg.rope_theta)
                             if cfg.position == "rotary" else None, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.output = nn.Linear(H, self.vocab_size_padded, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Megatron's initialisation: every weight ~ N(0, init_std), except the two
        projections that write into the residual stream (attention ``wo``, MLP ``w_down``),
        ~ N(0, init_std / sqrt(2 * num_layers)) so the residual's variance does not grow
        with depth; biases 0, norm gains 1. Also recomputes the position buffers, so that
        a model built on the meta device can be materialised with ``to_empty`` + this.

        ``seed=None`` draws from torch's global generator, parameter after parameter;
        with a seed each parameter comes from its own generator (:func:`initial_value`),
        which is how training initialises: the same values whichever layout, rank or
        device (meta, then sharded) builds the parameter."""
        if self.cfg.tie_embeddings:
            # to_empty() from the meta device can leave two separate tensors; tie again
            self.output.weight = self.tok_embeddings.weight
        if seed is not None:
            for name, p in self.named_parameters():
                p.copy_(initial_value(self.cfg, name, p.shape, seed, p.device, p.dtype))
            self.init_buffers()
            return
        std = self.cfg.init_std
        out_std = std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, 0.0, out_std if last in ("wo", "w_down") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the position tables (after ``to_empty``)."""
        init_position_buffers(self, self.cfg)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V_padded). With a ``KVCache`` (generation), the
        tokens continue the ``cache.length`` positions already run, whose keys and values
        the cache holds; the cache is extended by T. ``position_ids`` (T,) give the tokens'
        positions when they are not 0 .. T-1: under context parallelism a rank holds two
        chunks of each sequence (``mtnlg.parallel.cp``), whose attention core is swapped
        for one that knows them too."""
        B, T = tokens.shape
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.seq_length:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.seq_length="
                             f"{self.cfg.seq_length}")
        if position_ids is not None and cache is not None:
            raise ValueError("position_ids cannot be combined with a KVCache")
        pad = None if cache is None else cache.pad
        x = embed(self, tokens, start, pad, position_ids)                        # (B, T, H)
        rope = None
        if self.rope is not None and position_ids is not None:                   # (T, hd/2, 2)
            rope = self.rope[position_ids]
        elif self.rope is not None:                                              # (T | B,T, hd/2, 2)
            rope = self.rope[start:start + T] if pad is None else self.rope[positions(start, T, pad, tokens.device)]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache=None if cache is None else cache.layer(i))  # (B, T, H)
        if cache is not None:
            cache.length = start + T
        x = self.norm(x)
        return self.output(x)                                                    # (B, T, V_padded)


# ---------------------------------------------------------------------------------------
# Key/value cache for generation
# ---------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the positions already run, per layer, so that generating each
    new token costs one single-position forward pass instead of a whole window.

        cache = KVCache.for_model(model, batch_size=1)
        logits = model(prompt, cache=cache)        # prefill: cache.length = len(prompt)
        logits = model(next_token, cache=cache)    # (B, 1): attends to all cached positions

    Storage (B, seq_length, nkv, hd) per layer is allocated on first use, in the dtype and
    device of the keys (so autocast works). ``reset()`` starts a new sequence.

    Prompts of different lengths run as one batch left-padded to the longest: ``pad``
    (B,) says how many leading slots of each sequence are padding. Those slots are never
    attended to and positions count from each sequence's first real token, so each
    sequence's logits are those it would get alone (to rounding).
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, pad: torch.Tensor | None = None):
        if pad is not None and tuple(pad.shape) != (batch_size,):
            raise ValueError(f"pad must have shape ({batch_size},), got {tuple(pad.shape)}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        self.pad = pad
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, pad: torch.Tensor | None = None) -> KVCache:
        return cls(model.cfg.num_layers, batch_size, model.cfg.seq_length, pad)

    def reset(self) -> None:
        self.length = 0

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)


class LayerCache:
    """One layer's view of a ``KVCache``: appends the new positions' keys and values and
    returns those of every position so far."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, i = self.cache, self.index
        B, T = k.shape[:2]
        if B != c.batch_size:
            raise ValueError(f"batch of {B} sequences, but the cache was made for {c.batch_size}")
        if c.keys[i] is None:
            shape = (B, c.max_length, *k.shape[2:])                              # (B, T_max, nkv, hd)
            c.keys[i] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            c.values[i] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        elif c.keys[i].dtype != k.dtype or c.keys[i].device != k.device:
            raise ValueError(f"keys of {k.dtype} on {k.device}, but the cache holds "
                             f"{c.keys[i].dtype} on {c.keys[i].device}; make a new KVCache")
        end = c.length + T
        c.keys[i][:, c.length:end] = k
        c.values[i][:, c.length:end] = v
        return c.keys[i][:, :end], c.values[i][:, :end]                          # (B, S, nkv, hd)
