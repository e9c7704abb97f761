"""``ParallelConfig``: how a training run is split over processes."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtnlg.config import Config, ConfigError


@dataclass
class ParallelConfig(Config):
    # tensor-parallel degree: each layer's matmuls are split over this many ranks
    tp: int = field(default=1, metadata={"min": 1})
    # pipeline-parallel degree: the layers are split into this many stages (needs
    # model.num_layers % (pp * pp_virtual) == 0); tied embeddings are kept in step across
    # the first and the last stage (their gradients all-reduced, as Megatron does)
    pp: int = field(default=1, metadata={"min": 1})
    # pipeline schedule when pp > 1: "1f1b" (less activation memory) or "gpipe"; the
    # micro-batches are train.micro_batch_size each, local batch / micro_batch_size of them
    pp_schedule: str = field(default="1f1b", metadata={"choices": ("1f1b", "gpipe")})
    # virtual pipeline stages per rank (Megatron's interleaved schedule): > 1 splits the
    # layers into pp * pp_virtual chunks, rank r holding chunks r, r + pp, ..., and runs
    # interleaved 1F1B, whose bubble is (pp - 1) / (pp_virtual * m + pp - 1) for m micro-batches
    pp_virtual: int = field(default=1, metadata={"min": 1})
    # data-parallel degree; -1 = whatever is left: world_size // (tp * pp)
    dp: int = -1
    # shard norms, dropout and residuals over the sequence inside tensor-parallel groups
    sequence_parallel: bool = False
    # data parallel by FSDP2 (parameters, grads and optimizer state sharded) instead of DDP
    fsdp: bool = False
    # FSDP2 with several micro-batches per step (no pipeline parallelism): "micro_batch"
    # reduce-scatters each micro-batch's gradients, so no unsharded gradient outlives its
    # backward (more traffic: one reduce-scatter per micro-batch); "step" accumulates
    # unsharded fp32 gradients over the micro-batches and reduces once (4 bytes per
    # parameter of this rank's tensor-parallel share held for the whole step). Under
    # pipeline parallelism torch's schedule always reduces once per step.
    fsdp_grad_sync: str = field(default="micro_batch", metadata={"choices": ("micro_batch", "step")})
    # "selective": recompute only the attention core (softmax, dropout, weighted sum),
    # "full": recompute every transformer block in the backward pass
    activation_checkpoint: str = field(default="none",
                                       metadata={"choices": ("none", "selective", "full")})
    # torch.compile each transformer block
    compile: bool = False

    def validate(self) -> None:
        if self.dp != -1 and self.dp < 1:
            raise ConfigError(f"parallel.dp must be -1 (infer) or >= 1, got {self.dp}")
        if self.pp_virtual > 1 and self.pp_schedule != "1f1b":
            raise ConfigError(f"parallel.pp_virtual={self.pp_virtual} runs interleaved 1F1B; it needs "
                              f"parallel.pp_schedule=1f1b, got {self.pp_schedule!r}")
