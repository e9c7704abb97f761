"""``ParallelConfig``: how a training run is split over processes."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtnlg.config import Config, ConfigError

PP_SCHEDULES = ("1f1b", "gpipe", "interleaved-zb", "zbv", "dualpipev")
# the schedules that split the backward into input- and weight-gradient passes
ZERO_BUBBLE_SCHEDULES = ("interleaved-zb", "zbv", "dualpipev")
# two stages per rank in a V: rank r holds stages r and 2 * pp - 1 - r
V_SCHEDULES = ("zbv", "dualpipev")


@dataclass
class ParallelConfig(Config):
    # tensor-parallel degree: each layer's matmuls are split over this many ranks
    tp: int = field(default=1, metadata={"min": 1})
    # pipeline-parallel degree: the layers are split into this many stages (needs
    # model.num_layers % (pp * pp_virtual) == 0); tied embeddings are kept in step across
    # the first and the last stage (their gradients all-reduced, as Megatron does)
    pp: int = field(default=1, metadata={"min": 1})
    # pipeline schedule when pp > 1 (m micro-batches of train.micro_batch_size each, local
    # batch / micro_batch_size of them; bubble = idle share of a step at equal forward,
    # input-gradient and weight-gradient times, docs/performance.md#pipeline-bubble):
    #   "1f1b"  one forward, one backward (less activation memory); bubble (pp-1)/(m+pp-1)
    #   "gpipe" all forwards, then all backwards; same bubble, m micro-batches in flight
    #   the zero-bubble schedules split each backward into input and weight gradients, the
    #   weight gradients filling the bubble (not with fsdp or compile):
    #   "interleaved-zb"  ZB1P over pp_virtual = v >= 2 looped virtual stages; bubble
    #           (pp-1)/(3*v*m + pp-1)
    #   "zbv"   ZB-V: pp_virtual=2, rank r holds stages r and 2*pp-1-r; bubble
    #           (pp-1)/(6m + pp-1) from m >= 2*pp-2 (fewer: u/(6m+u), u = 2(2*pp-1-m))
    #   "dualpipev"  DeepSeek's DualPipeV in the same V (pp_virtual=2; steps with fewer
    #           than 2*pp micro-batches run zbv); bubble (pp-1)/(6m + pp-1)
    pp_schedule: str = field(default="1f1b", metadata={"choices": PP_SCHEDULES})
    # virtual pipeline stages per rank (Megatron's interleaved schedule): > 1 splits the
    # layers into pp * pp_virtual chunks, rank r holding chunks r, r + pp, ... (looped; the
    # V schedules: r and 2*pp-1-r); with pp_schedule=1f1b it runs interleaved 1F1B, whose
    # bubble is (pp - 1) / (pp_virtual * m + pp - 1) for m micro-batches
    pp_virtual: int = field(default=1, metadata={"min": 1})
    # data-parallel degree; -1 = whatever is left: world_size // (tp * pp * cp)
    dp: int = -1
    # context-parallel degree: each sequence is split over this many ranks (rank r holds
    # chunks r and 2*cp-1-r of 2*cp; needs model.seq_length % (2 * cp) == 0), attention
    # all-gathering keys and values over them (mtnlg.parallel.cp); gradients are averaged
    # over dp * cp ranks
    cp: int = field(default=1, metadata={"min": 1})
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
        self._check_pp_schedule()

    def _check_pp_schedule(self) -> None:
        s, v = self.pp_schedule, self.pp_virtual
        if s == "gpipe" and v > 1:
            raise ConfigError(f"parallel.pp_virtual={v} runs interleaved 1F1B; it needs "
                              f"parallel.pp_schedule=1f1b (or a zero-bubble schedule: interleaved-zb, "
                              f"zbv, dualpipev), got {s!r}")
        if s == "interleaved-zb" and v < 2:
            raise ConfigError(f"parallel.pp_schedule=interleaved-zb runs virtual stages; it needs "
                              f"parallel.pp_virtual >= 2, got {v}")
        if s in V_SCHEDULES and v != 2:
            raise ConfigError(f"parallel.pp_schedule={s} holds 2 stages per rank in a V (rank r: stages "
                              f"r and 2*pp-1-r); it needs parallel.pp_virtual=2, got {v}")
        if s in ZERO_BUBBLE_SCHEDULES and self.fsdp:
            # measured: pp=2 x FSDP2 dp=2 with interleaved-zb or zbv, 3 steps: gradient norms
            # up to 20% off the single process's (torch 2.13); DDP matches within 1e-7
            raise ConfigError(f"parallel.pp_schedule={s} with parallel.fsdp=true gives wrong gradients "
                              f"(FSDP2 and the split weight-gradient pass of torch.distributed.pipelining "
                              f"disagree); use parallel.fsdp=false (DDP) or pp_schedule=1f1b")
        if s in ZERO_BUBBLE_SCHEDULES and self.compile:
            raise ConfigError(f"parallel.pp_schedule={s} splits the backward into input and weight "
                              f"gradients, which torch.distributed.pipelining does not do for "
                              f"compiled blocks; set parallel.compile=false or use 1f1b")
