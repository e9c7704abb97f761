"""Cross-entropy over vocabulary-sharded logits.

Under tensor parallelism the output head leaves the logits sharded over the vocabulary
(a DTensor placed ``Shard(-1)``). Gathering (B, T, V) logits on every rank would cost
``V / tp`` times more memory than needed; instead, inside ``loss_parallel`` the softmax's
max and sum are all-reduced across the tensor-parallel group (Megatron's
vocab-parallel cross-entropy). Run forward, loss and backward inside the context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


@contextlib.contextmanager
def loss_parallel_context(enabled: bool) -> Iterator[None]:
    """``torch.distributed.tensor.parallel.loss_parallel()`` when ``enabled``, else nothing."""
    if not enabled:
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():
        yield


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss. logits (B, T, V) (a DTensor under tensor parallelism),
    targets (B, T) int64; positions whose target is ``ignore_index`` do not count.
    Computed in fp32 whatever the logits' dtype. Returns a plain scalar tensor (the
    replicated loss of vocab-sharded logits is unwrapped; gradients flow through)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1),
                           ignore_index=ignore_index)
    if isinstance(loss, DTensor):
        loss = loss.full_tensor()
    return loss
