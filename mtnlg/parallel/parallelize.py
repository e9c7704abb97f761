"""``parallelize_gpt``: turn a single-device ``GPT`` into the parallel model of a run.

Applied in torchtitan's order, each step seeing the result of the one before:

1. tensor (+ sequence) parallelism on the ``"tp"`` mesh dimension (``tensor_parallel``);
2. activation checkpointing: "full" wraps every transformer block, "selective" only the
   attention core (Megatron's selective recomputation: the (B, nh, T, T) softmax and
   dropout are the memory-heavy, FLOP-cheap part);
3. ``torch.compile`` of each block (in place, so parameter names do not change);
4. data parallelism on the ``"dp"`` mesh dimension: FSDP2 ``fully_shard`` (parameters,
   gradients and optimizer state sharded, composed with TP as a 2-D mesh), or DDP as
   FSDP2's replicate (parameters replicated, gradients all-reduced; it composes with TP
   the same way). Each block is its own communication group so the gradient
   reduction of block i overlaps the backward of block i-1; the root holds the
   embeddings, final norm and head (a tied weight must sit in one group).

Gradients are averaged over data-parallel ranks, so with each rank's loss the mean over
its own micro-batch, gradients equal those of the mean loss over the global batch.
Parameters keep their names, except that "full"/"selective" checkpointing inserts
``_checkpoint_wrapped_module`` into ``named_parameters()`` (``state_dict()`` and
``torch.distributed.checkpoint.state_dict`` strip it again).
"""

from __future__ import annotations

from torch import nn

from mtnlg.config import ConfigError
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.tensor_parallel import apply_tensor_parallel
from mtnlg.progress import get_logger

log = get_logger(__name__)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    # named_children: a pipeline stage keeps its layers in a ModuleDict keyed by the
    # global layer index, a whole GPT in a ModuleList; both take register_module
    for name, block in list(model.layers.named_children()):
        if mode == "full":
            model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=True))
        else:  # "selective" (the config allows nothing else)
            block.attention.core_attention = checkpoint_wrapper(
                block.attention.core_attention, preserve_rng_state=True)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: the blocks are identical, so one compilation is
    reused L times, and the graph stays small."""
    for block in model.layers.children():
        block.compile()


def apply_data_parallel(model: nn.Module, dp_mesh, fsdp: bool, param_dtype=None) -> None:
    """DDP (FSDP2's replicate) or FSDP2 over ``dp_mesh``. With ``param_dtype`` (bf16 on a
    bf16 run) FSDP2 gathers parameters in that dtype and reduces gradients in fp32
    (``MixedPrecisionPolicy``), halving the all-gather traffic of fp32 master weights."""
    import torch

    kwargs = {}
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from torch.distributed.fsdp import fully_shard as wrap

        if param_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    else:
        from torch.distributed._composable.replicate_with_fsdp import replicate as wrap
    for block in model.layers.children():
        wrap(block, mesh=dp_mesh, **kwargs)
    wrap(model, mesh=dp_mesh, **kwargs)


def parallelize_gpt(model: nn.Module, mesh, cfg: ParallelConfig, param_dtype=None) -> nn.Module:
    """Parallelize ``model`` (a ``GPT`` or a pipeline ``GPTStage``, on the mesh's device)
    in place and return it.

    ``mesh`` is the stage's ``("dp", "tp")`` mesh: ``mesh["dp", "tp"]`` of
    ``ParallelDims.build_mesh`` (a ``(pp, dp, tp)`` mesh is taken for its last two dims). Build the model
    with the same seed on every rank (``set_seed_for_rank``) and with ``GPT(cfg, tp)``.
    """
    names = tuple(mesh.mesh_dim_names or ())
    if names[-2:] != ("dp", "tp"):
        raise ValueError(f"parallelize_gpt needs a 2-D mesh named ('dp', 'tp'), got {names}")
    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]  # of this rank's stage
    tp, dp = tp_mesh.size(), dp_mesh.size()
    sp = cfg.sequence_parallel and tp > 1
    if cfg.compile and sp and mesh.device_type == "cpu":
        # inductor's AOT-autograd tracing of a sequence-parallel block recurses without
        # end on CPU (torch 2.13); TP alone, DDP and FSDP2 compile fine
        raise ConfigError("parallel.compile=true with parallel.sequence_parallel=true does not "
                          "compile on CPU; turn one of them off")
    if tp > 1:
        # compiled blocks take counter-based per-rank dropout masks: no generator seeding
        # inside the graph (no graph breaks, no recompiles on seed values)
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=sp, rng="counter" if cfg.compile else "fork")
    apply_activation_checkpointing(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model)
    if dp > 1:
        apply_data_parallel(model, dp_mesh, fsdp=cfg.fsdp, param_dtype=param_dtype)
    log.info("parallelized GPT: tp=%d%s, dp=%d (%s), activation checkpointing %s%s", tp,
             " + sequence parallel" if sp else "", dp,
             "FSDP2" if cfg.fsdp else "DDP" if dp > 1 else "none", cfg.activation_checkpoint,
             ", compiled" if cfg.compile else "")
    return model
