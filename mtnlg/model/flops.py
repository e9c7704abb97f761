"""Parameter and FLOP counts from a ``ModelConfig`` alone (no module is built).

``count_parameters`` equals ``sum(p.numel() for p in GPT(cfg, tp).parameters())`` exactly
(a tied head is counted once); the tests hold the two together.

``flops_per_token`` is the training cost (forward + backward) used for MFU, the PaLM
estimate ``6 N + 12 L H T``: 6 FLOPs per matmul weight per token (2 forward, 4 backward),
plus the attention scores and the weighted sum of values (2 x 2 T H per layer forward,
times 3 with backward). N counts the weights that take part in matmuls: every parameter
except the input-side embedding tables (a lookup, not a matmul); the output head counts
once, tied or not. Activation recomputation is not counted (it is not useful work), and
the causal mask's skipped half of the attention matrix is, as PaLM and Megatron do.
"""

from __future__ import annotations

from mtnlg.model.config import ModelConfig


def norm_parameters(cfg: ModelConfig) -> int:
    """Parameters of one norm (scale, and shift for LayerNorm with biases)."""
    H = cfg.hidden_size
    return 2 * H if cfg.norm == "layernorm" and cfg.bias else H


def layer_parameters(cfg: ModelConfig) -> int:
    """Parameters of one transformer block."""
    H, hd, Fs = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    q, kv = cfg.num_heads * hd, cfg.kv_heads * hd
    attn = H * q + 2 * H * kv + q * H
    mlp = (3 if cfg.activation == "swiglu" else 2) * H * Fs
    biases = 0
    if cfg.bias:
        biases = q + 2 * kv + H + (2 * Fs if cfg.activation == "swiglu" else Fs) + H
    return attn + mlp + biases + 2 * norm_parameters(cfg)


def count_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Total parameters of ``GPT(cfg, tp)`` (the vocabulary padded for ``tp``)."""
    H, V = cfg.hidden_size, cfg.padded_vocab_size(tp)
    n = V * H                                                  # token embedding
    if cfg.position == "learned":
        n += cfg.seq_length * H                                # position embedding
    n += cfg.num_layers * layer_parameters(cfg)
    n += norm_parameters(cfg)                                     # final norm
    if not cfg.tie_embeddings:
        n += V * H                                             # separate output head
    return n


def matmul_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """N of ``6 N``: the blocks, the final norm and the output head (V x H)."""
    H, V = cfg.hidden_size, cfg.padded_vocab_size(tp)
    return cfg.num_layers * layer_parameters(cfg) + norm_parameters(cfg) + V * H


def flops_per_token(cfg: ModelConfig, tp: int = 1, seq_length: int | None = None) -> float:
    """Training FLOPs per token: ``6 N + 12 L H T`` (T = ``seq_length`` or the model's)."""
    T = cfg.seq_length if seq_length is None else seq_length
    return 6.0 * matmul_parameters(cfg, tp) + 12.0 * cfg.num_layers * cfg.hidden_size * T
