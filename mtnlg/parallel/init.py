"""Meta-device initialisation: build on ``meta``, parallelize, then allocate and initialise
only this rank's shards, as torchtitan does.

    with torch.device("meta"):
        model = GPT(cfg, tp=dims.tp)            # no memory: shapes only
    model = parallelize_gpt(model, mesh, dims)  # or a PipelineParallel's stage(s)
    materialize(model, cfg, device, seed)       # to_empty + each shard's initial values

Initialisation is layout-independent: parameter ``name`` (its global name) is drawn whole
from its own generator, seeded by the run's seed and the name
(:func:`mtnlg.model.gpt.initial_value`), and each rank keeps its slice of it
(``distribute_tensor(..., src_data_rank=None)``: a local slice, no communication). So a
rank allocates its shards only (plus one whole parameter at a time, transiently, on the
device), every layout starts from the weights a single device would have
(``GPT.init_weights(seed=...)``), and tensor-parallel shards differ as slices of one
matrix should. A pipeline rank builds only its stage's parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import init_position_buffers, initial_value

_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def global_name(name: str) -> str:
    """A parameter's name without the wrappers' inserted components."""
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


@torch.no_grad()
def materialize(model: nn.Module, cfg: ModelConfig, device: torch.device, seed: int) -> None:
    """Allocate ``model`` (built on ``meta`` and parallelized) on ``device`` and give every
    parameter its initial value; position buffers are recomputed."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    if cfg.tie_embeddings and hasattr(model, "output") and hasattr(model, "tok_embeddings"):
        if model.output.weight is not model.tok_embeddings.weight:
            model.output.weight = model.tok_embeddings.weight  # to_empty can leave two tensors
    for name, p in model.named_parameters():
        whole = initial_value(cfg, global_name(name), p.shape, seed, device, p.dtype)
        if isinstance(p, DTensor):
            local = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(whole)
        del whole
    for module in model.modules():
        init_position_buffers(module, cfg)


def local_parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of this rank's parameter shards, bytes of the storage behind them): equal when
    no parameter holds more than its shard."""
    from torch.distributed.tensor import DTensor

    shard = storage = 0
    seen: set[int] = set()
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        shard += t.numel() * t.element_size()
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            storage += t.untyped_storage().nbytes()
    return shard, storage
