"""``ModelConfig``: the sizes and architecture choices of a decoder-only GPT.

One dataclass describes every model mtnlg trains, from the 2-layer debug model to the
530B MT-NLG shape. Derived sizes (``kv_heads``, ``ffn_size``, ``head_dim``) are
properties, so that overriding ``hidden_size`` on the command line also moves the
feed-forward width when ``ffn_hidden_size`` is left at ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtnlg.config import Config, ConfigError


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


@dataclass
class ModelConfig(Config):
    num_layers: int = field(default=2, metadata={"min": 1})
    hidden_size: int = field(default=64, metadata={"min": 1})
    num_heads: int = field(default=4, metadata={"min": 1})
    # None = num_heads (plain multi-head attention); fewer = grouped-query attention.
    num_kv_heads: int | None = field(default=None, metadata={"min": 1})
    # None = 4 * hidden (GeLU) or 8/3 * hidden rounded up to a multiple of 64 (SwiGLU,
    # which keeps the parameter count of a 4x GeLU MLP).
    ffn_hidden_size: int | None = field(default=None, metadata={"min": 1})
    seq_length: int = field(default=128, metadata={"min": 1})
    vocab_size: int = field(default=512, metadata={"min": 1})
    # The embedding table is padded to a multiple of this times the tensor-parallel degree
    # (Megatron's --make-vocab-size-divisible-by), so every rank holds an equal vocab slice.
    make_vocab_size_divisible_by: int = field(default=128, metadata={"min": 1})
    position: str = field(default="learned",
                          metadata={"choices": ("learned", "sinusoidal", "rotary")})
    norm: str = field(default="layernorm", metadata={"choices": ("layernorm", "rmsnorm")})
    activation: str = field(default="gelu", metadata={"choices": ("gelu", "swiglu")})
    tie_embeddings: bool = True
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    attention_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    bias: bool = True
    init_std: float = field(default=0.02, metadata={"gt": 0.0})
    norm_eps: float = field(default=1e-5, metadata={"gt": 0.0})
    rope_theta: float = field(default=10000.0, metadata={"gt": 0.0})

    # ---- derived sizes -------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return round_up(8 * self.hidden_size // 3, 64)
        return 4 * self.hidden_size

    def padded_vocab_size(self, tp: int = 1) -> int:
        """``vocab_size`` rounded up to a multiple of ``make_vocab_size_divisible_by * tp``."""
        if tp < 1:
            raise ConfigError(f"tensor-parallel degree must be >= 1, got {tp}")
        return round_up(self.vocab_size, self.make_vocab_size_divisible_by * tp)

    def validate(self) -> None:
        """Cross-field rules (each field's own range is in its metadata); each message names
        the numbers involved."""
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            if self.num_kv_heads > self.num_heads:
                raise ConfigError(
                    f"model.num_kv_heads={self.num_kv_heads} must be between 1 and "
                    f"model.num_heads={self.num_heads}")
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(
                    f"model.num_heads={self.num_heads} is not divisible by "
                    f"model.num_kv_heads={self.num_kv_heads} (each key/value head serves a "
                    f"whole group of query heads)")
        if self.position == "rotary" and self.head_dim % 2:
            raise ConfigError(
                f"rotary positions need an even head size; model.hidden_size={self.hidden_size} "
                f"/ model.num_heads={self.num_heads} = {self.head_dim}")
        if self.position == "sinusoidal" and self.hidden_size % 2:
            raise ConfigError(
                f"sinusoidal positions need an even model.hidden_size, got {self.hidden_size}")
