"""Per-process bodies of the meta-initialisation tests (run by ``tests/distributed.py``).

Each layout is built twice on every rank: eagerly (the whole GPT on the CPU, initialised
with ``init_weights(seed=SEED)``, then parallelized) and on the meta device
(parallelized, then ``materialize``); both train ``STEPS`` AdamW steps on the same batches.
Returned: whether every local shard is bitwise equal after initialisation, the losses of
both paths, and the bytes of the meta path's parameter shards and of their storage.
"""

from __future__ import annotations

import hashlib

import torch
from parallel_workers import MAX_NORM, STEPS, local_rows, tiny, tokens_for_step
from torch.distributed.tensor import DTensor

from mtnlg.model.gpt import GPT
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.init import global_name, local_parameter_bytes, materialize
from mtnlg.parallel.loss import cross_entropy, loss_parallel_context
from mtnlg.parallel.parallelize import parallelize_gpt
from mtnlg.parallel.pipeline_parallel import PipelineParallel
from mtnlg.parallel.utils import clip_grad_norm_, set_seed_for_rank

SEED = 1234
CPU = torch.device("cpu")


def _build(cfg, pc: ParallelConfig, dims: ParallelDims, mesh, meta: bool):
    set_seed_for_rank(0)
    if meta:
        with torch.device("meta"):
            model = GPT(cfg, tp=dims.tp)
    else:
        model = GPT(cfg, tp=dims.tp)
        model.init_weights(seed=SEED)
    if dims.pp > 1:
        pipe = PipelineParallel(model, mesh, dims, pc, CPU)
        if meta:
            for chunk in pipe.chunks:
                materialize(chunk, cfg, CPU, SEED)
        return pipe, pipe.model
    model = parallelize_gpt(model, mesh["dp", "tp"], dims, activation_checkpoint=pc.activation_checkpoint,
                            compile=pc.compile)
    if meta:
        materialize(model, cfg, CPU, SEED)
    return None, model


def _shards(model) -> dict[str, str]:
    return {global_name(n): hashlib.sha256((p.to_local() if isinstance(p, DTensor) else p).detach()
                                           .contiguous().numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}


def _train(pipe, model, mesh, dims) -> list[float]:
    set_seed_for_rank(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(STEPS):
        tokens = local_rows(tokens_for_step(step), mesh, dims)
        if pipe is not None:
            loss = pipe.forward_backward(tokens[:, :-1], tokens[:, 1:], 2)
            t = torch.tensor([float(loss) if loss is not None else 0.0])
            norm = float(clip_grad_norm_(model.parameters(), MAX_NORM, pp_group=mesh.get_group("pp"),
                                         duplicates=pipe.tied_copy))
        else:
            with loss_parallel_context(dims.tp > 1):
                loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
                loss.backward()
            t = loss.detach().reshape(1).clone()
            norm = float(clip_grad_norm_(model.parameters(), MAX_NORM))
        torch.distributed.all_reduce(t)
        losses.append(float(t) / (dims.world_size // dims.pp))
        losses.append(norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def compare(model_kw: dict, pc: ParallelConfig, world: int) -> dict:
    cfg = tiny(**model_kw)
    dims = ParallelDims.build(pc, world, cfg)
    mesh = dims.build_mesh("cpu")
    eager_pipe, eager = _build(cfg, pc, dims, mesh, meta=False)
    meta_pipe, meta = _build(cfg, pc, dims, mesh, meta=True)
    same_init = _shards(eager) == _shards(meta)
    shard, storage = local_parameter_bytes(meta)
    return {"same_init": same_init, "eager": _train(eager_pipe, eager, mesh, dims),
            "meta": _train(meta_pipe, meta, mesh, dims), "shard_bytes": shard, "storage_bytes": storage,
            "whole_bytes": sum(p.numel() * 4 for p in GPT(cfg, tp=dims.tp).parameters())}


def four_process_checks(rank: int, world: int) -> dict:
    return {
        "tp2+sp x dp2-fsdp": compare({}, ParallelConfig(tp=2, sequence_parallel=True, fsdp=True), world),
        "tp2 x dp2-ddp llama": compare({"position": "rotary", "norm": "rmsnorm", "activation": "swiglu",
                                        "num_kv_heads": 2, "tie_embeddings": False, "bias": False},
                                       ParallelConfig(tp=2), world),
        "pp2x2 tied x tp2": compare({"num_layers": 4}, ParallelConfig(pp=2, pp_virtual=2, tp=2), world),
    }
