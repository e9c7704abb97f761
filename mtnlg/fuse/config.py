"""``FuseConfig``: how ``mtnlg fuse`` writes the fused model."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtnlg.config import Config


@dataclass
class FuseConfig(Config):
    # dtype of the written weights
    dtype: str = field(default="fp32", metadata={"choices": ("fp32", "bf16", "fp16")})
    # also write a Hugging Face model directory into OUTPUT/hf
    hf: bool = True
    # largest safetensors file before the weights are split into shards
    max_shard_bytes: int = field(default=2 << 30, metadata={"min": 1})
    # compare the fused model's logits with the checkpoint's; None = for models up to 2B parameters
    verify: bool | None = None
