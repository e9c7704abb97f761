"""Named model sizes. ``get_preset("mtnlg-530b")`` -> ``ModelConfig``.

The MT-NLG-shaped presets follow the Megatron GPT line: learned absolute positions,
pre-LayerNorm, GeLU MLP of width 4H, biases, tied embeddings, init std 0.02 (0.004 for
530B: about sqrt(1 / 3H), since wider layers need a smaller init), dropout 0.1 on hidden states and
attention probabilities (Megatron's defaults), the 50257-token GPT-2 BPE vocabulary,
sequence 2048. ``vocab_size`` is normally replaced by the trained tokenizer's size;
parameter counts below are at the preset's own vocabulary and tp=1.

=============  ======  ======  =====  =====  ====  ========
name           layers  hidden  heads  ffn    seq   params
=============  ======  ======  =====  =====  ====  ========
debug          2       64      4      256    64    0.14M
tiny           4       128     4      512    128   0.94M
tiny-llama     4       128     4/2kv  384    128   1.05M
small-20m      5       512     8      2048   256   20.1M
gpt-125m       12      768     12     3072   1024  124.5M
mtnlg-1.3b     24      2048    16     8192   2048  1.32B
mtnlg-8.3b     72      3072    24     12288  2048  8.32B
mtnlg-530b     105     20480   128    81920  2048  529.6B
=============  ======  ======  =====  =====  ====  ========
"""

from __future__ import annotations

import dataclasses

from mtnlg.config import ConfigError
from mtnlg.model.config import ModelConfig

_GPT2_VOCAB = 50257
_MEGATRON = dict(position="learned", norm="layernorm", activation="gelu", tie_embeddings=True,
                 bias=True, dropout=0.1, attention_dropout=0.1, vocab_size=_GPT2_VOCAB,
                 seq_length=2048)

PRESETS: dict[str, ModelConfig] = {
    # For tests and smoke runs: seconds on a CPU.
    "debug": ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_length=64,
                         vocab_size=512),
    "tiny": ModelConfig(num_layers=4, hidden_size=128, num_heads=4, seq_length=128,
                        vocab_size=1024),
    # Llama-style choices at the same scale: rotary, RMSNorm, SwiGLU, grouped-query heads.
    "tiny-llama": ModelConfig(num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2,
                              seq_length=128, vocab_size=1024, position="rotary",
                              norm="rmsnorm", activation="swiglu", tie_embeddings=False,
                              bias=False),
    # The CPU benchmark size (8k vocabulary, as the bundled tokenizer recipe trains).
    "small-20m": ModelConfig(num_layers=5, hidden_size=512, num_heads=8, seq_length=256,
                             vocab_size=8192),
    # GPT-2 small.
    "gpt-125m": ModelConfig(num_layers=12, hidden_size=768, num_heads=12, seq_length=1024,
                            vocab_size=_GPT2_VOCAB),
    # Megatron / MT-NLG shapes.
    "mtnlg-1.3b": ModelConfig(num_layers=24, hidden_size=2048, num_heads=16, **_MEGATRON),
    "mtnlg-8.3b": ModelConfig(num_layers=72, hidden_size=3072, num_heads=24, **_MEGATRON),
    "mtnlg-530b": ModelConfig(num_layers=105, hidden_size=20480, num_heads=128,
                              **{**_MEGATRON, "init_std": 0.004}),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset (so callers may modify it)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
