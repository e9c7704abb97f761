"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

    next_id = sample_next_token(logits, temperature=0.8, top_k=50, top_p=0.95, generator=g)

``temperature == 0`` means greedy (argmax), which ignores top-k/top-p and the generator.
Filters apply in the usual order: temperature scales the logits, top-k keeps the k
largest, top-p keeps the smallest set of the most likely tokens whose probabilities add
up to at least p (the most likely token always survives), then one token is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtnlg.config import Config, ConfigError


@dataclass
class SamplingConfig(Config):
    """How to pick tokens; the defaults are greedy decoding."""

    max_new_tokens: int = field(default=64, metadata={"min": 0})
    temperature: float = field(default=0.0, metadata={"min": 0.0})
    top_k: int = field(default=0, metadata={"min": 0})  # 0 = no top-k filter
    top_p: float = field(default=1.0, metadata={"gt": 0.0, "max": 1.0})  # 1.0 = no nucleus filter
    seed: int | None = None
    stop_at_eod: bool = True
    # the end-of-document token cannot be drawn before this many new tokens
    min_new_tokens: int = field(default=0, metadata={"min": 0})
    # > 1 discourages tokens already in the prompt or the output (the CTRL / Hugging Face
    # rule: a positive logit is divided by it, a negative one multiplied); 1 = off
    repetition_penalty: float = field(default=1.0, metadata={"gt": 0.0})

    def __post_init__(self):
        super().__post_init__()
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"min_new_tokens={self.min_new_tokens} exceeds max_new_tokens={self.max_new_tokens}")


def adjust_logits(logits: torch.Tensor, history: list[int], generated: int, sampling: SamplingConfig,
                  eod_id: int | None) -> torch.Tensor:
    """``logits`` (V,) of one sequence after the repetition penalty over ``history`` (the
    prompt and the tokens so far) and, before ``min_new_tokens``, with end-of-document
    forbidden. Returns a new tensor when anything changes."""
    if sampling.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / sampling.repetition_penalty, vals * sampling.repetition_penalty)
    if eod_id is not None and generated < sampling.min_new_tokens:
        logits = logits.clone()
        logits[eod_id] = float("-inf")
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the ``k`` largest logits of each row to -inf.  logits: (B, V) -> (B, V)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                        # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``.
    logits: (B, V) -> (B, V)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)          # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    # mass of the tokens strictly before each one: a token is kept while that is < p,
    # so the first (most likely) token is always kept
    before = torch.cumsum(probs, dim=-1) - probs                                 # (B, V)
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)        # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One next token per row.  logits: (B, V) -> token ids (B,)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    scaled = logits.float() / temperature
    scaled = top_p_filter(top_k_filter(scaled, top_k), top_p)
    probs = torch.softmax(scaled, dim=-1)                                        # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)         # (B,)
