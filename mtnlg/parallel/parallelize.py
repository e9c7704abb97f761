"""``parallelize_gpt``: turn a single-device ``GPT`` into the parallel model of a run.

Applied in torchtitan's order, each step seeing the result of the one before:

0. with ``cp > 1``, context parallelism on the ``"cp"`` mesh dimension
   (``mtnlg.parallel.cp``): each block's attention core becomes the all-gather one, first,
   so tensor parallelism's per-rank dropout hooks land on it;
1. tensor (+ sequence) parallelism on the ``"tp"`` mesh dimension (``tensor_parallel``);
2. activation checkpointing: "full" wraps every transformer block, "selective" only the
   attention core (Megatron's selective recomputation: the (B, nh, T, T) softmax and
   dropout are the memory-heavy, FLOP-cheap part);
3. ``torch.compile`` of each block (in place, so parameter names do not change);
4. data parallelism on the ``"dp"`` mesh dimension (with ``cp > 1`` on ``("dp", "cp")``
   flattened, ``dp_cp_mesh``, so the cp ranks' per-chunk losses average into one sequence
   mean): FSDP2 ``fully_shard`` (parameters, gradients and optimizer state sharded,
   composed with TP as a 2-D mesh), or DDP as FSDP2's replicate (parameters replicated,
   gradients all-reduced; it composes with TP the same way). Each block is its own communication group so the gradient
   reduction of block i overlaps the backward of block i-1; the root holds the
   embeddings, final norm and head (a tied weight must sit in one group).

A ``train.dtype=fp8`` model arrives with its linear layers already converted to float8
(``mtnlg.parallel.float8``, on the whole model before any of this, as torchtitan converts
before it parallelizes); each step above sees ordinary ``nn.Linear`` parameters. Tensor
parallelism of float8 layers would need torchao's float8 plan styles, so it is refused.

Gradients are averaged over data-parallel ranks, so with each rank's loss the mean over
its own micro-batch, gradients equal those of the mean loss over the global batch.
Parameters keep their names, except that "full"/"selective" checkpointing inserts
``_checkpoint_wrapped_module`` into ``named_parameters()`` (``state_dict()`` and
``torch.distributed.checkpoint.state_dict`` strip it again).
"""

from __future__ import annotations

from torch import nn

from mtnlg.config import ConfigError
from mtnlg.parallel.cp import apply_context_parallel, dp_cp_mesh
from mtnlg.parallel.dims import ParallelDims
from mtnlg.parallel.float8 import float8_layers
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


def parallelize_gpt(model: nn.Module, mesh, dims: ParallelDims, *, activation_checkpoint: str = "none",
                    compile: bool = False, param_dtype=None) -> nn.Module:
    """Parallelize ``model`` (a ``GPT`` or a pipeline ``GPTStage``, on the mesh's device)
    in place and return it.

    ``mesh`` is the stage's mesh, its dimensions ending in ``("dp", "tp")``, or
    ``("dp", "cp", "tp")`` when ``dims.cp > 1``: the whole mesh of
    ``ParallelDims.build_mesh`` (``pp`` outermost, unused here) or a pipeline stage's
    ``mesh["dp", "tp"]`` (``mesh["dp", "cp", "tp"]`` with context parallelism). ``dims`` is
    the checked layout the mesh was built from; its choices (sequence parallelism only with ``tp > 1``, FSDP only with ``dp * cp > 1``)
    are applied as they are. ``activation_checkpoint`` and ``compile`` are
    ``parallel.activation_checkpoint`` and ``parallel.compile``. Build the model with the
    same seed on every rank (``set_seed_for_rank``) and with ``GPT(cfg, tp)``.
    """
    want = ("dp", "cp", "tp") if dims.cp > 1 else ("dp", "tp")
    names = tuple(mesh.mesh_dim_names or ())
    if names[-len(want):] != want:
        raise ValueError(f"parallelize_gpt needs a {len(want)}-D mesh named {want}, got {names}")
    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]  # of this rank's stage
    cp = mesh["cp"].size() if dims.cp > 1 else 1
    if (dp_mesh.size(), cp, tp_mesh.size()) != (dims.dp, dims.cp, dims.tp):
        raise ValueError(f"parallelize_gpt got a mesh of dp={dp_mesh.size()} x cp={cp} x tp={tp_mesh.size()} "
                         f"for a layout of dp={dims.dp} x cp={dims.cp} x tp={dims.tp}; build the mesh "
                         f"with dims.build_mesh")
    sp = dims.sequence_parallel
    if dims.tp > 1 and float8_layers(model):
        # ColwiseParallel/RowwiseParallel would shard Float8Linear as a plain Linear and
        # all-gather bf16 activations; torchao's Float8*Parallel styles are not in the plan
        raise ConfigError(f"train.dtype=fp8 with parallel.tp={dims.tp}: float8 layers under tensor parallelism "
                          f"are not supported; use parallel.tp=1 or train.dtype=bf16")
    if compile and sp and mesh.device_type == "cpu":
        # inductor's AOT-autograd tracing of a sequence-parallel block recurses without
        # end on CPU (torch 2.13); TP alone, DDP and FSDP2 compile fine
        raise ConfigError("parallel.compile=true with parallel.sequence_parallel=true does not "
                          "compile on CPU; turn one of them off")
    if compile and dims.cp > 1:  # ParallelDims.build refuses the config; this is the direct call
        raise ConfigError(f"parallel.cp={dims.cp} with parallel.compile=true: the context-parallel "
                          f"attention core is not compiled yet; set parallel.compile=false")
    if dims.cp > 1:
        apply_context_parallel(model, mesh["cp"])
    if dims.tp > 1:
        # compiled blocks take counter-based per-rank dropout masks: no generator seeding
        # inside the graph (no graph breaks, no recompiles on seed values)
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=sp, rng="counter" if compile else "fork")
    apply_activation_checkpointing(model, activation_checkpoint)
    if compile:
        apply_compile(model)
    if dims.dp * dims.cp > 1:
        apply_data_parallel(model, dp_cp_mesh(mesh), fsdp=dims.fsdp, param_dtype=param_dtype)
    log.info("parallelized GPT: %stp=%d%s, dp=%d (%s), activation checkpointing %s%s",
             f"cp={dims.cp}, " if dims.cp > 1 else "", dims.tp, " + sequence parallel" if sp else "", dims.dp,
             "FSDP2" if dims.fsdp else "DDP" if dims.dp * dims.cp > 1 else "none", activation_checkpoint,
             ", compiled" if compile else "")
    return model
