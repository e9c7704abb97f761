"""AdamW with Megatron's weight-decay split.

Megatron-LM (``get_param_groups``) applies weight decay to the weight matrices only:
biases and every 1-D parameter (LayerNorm/RMSNorm scales and shifts) are excluded, since
decaying a norm's gain toward 0 or a bias toward 0 only fights the data. The embedding
tables are matrices and are decayed, as in Megatron.
"""

from __future__ import annotations

import torch
from torch import nn

from mtnlg.model.gpt import no_weight_decay, weight_decay_groups  # noqa: F401 (no_weight_decay: re-exported)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and undecayed biases/norms (empty groups dropped)."""
    params = dict(model.named_parameters())
    decay, no_decay = weight_decay_groups(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model)``; ``foreach`` kernels (multi-tensor, DTensor-safe)."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=True)
