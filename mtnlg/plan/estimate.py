"""Per-GPU memory and step time of one training layout, from the model's sizes alone.

``estimate(model, layout, workload, gpu)`` -> :class:`Estimate`. Nothing is built or run:
it is arithmetic on the :class:`~mtnlg.model.config.ModelConfig`, the layout and the
declared constants of the GPU kind (``mtnlg.plan.hardware``). Every term is a named field
of the result; docs/plan.md states each formula and its source.

**Memory** of the most loaded rank, in bytes, for the trainer as it is (fp32 parameters,
bf16 autocast, AdamW): weights 4 B/parameter, gradients 4 B, AdamW's moments 8 B (FSDP
shards them over the ``dp x cp`` ranks that hold the same weights), the bf16 copies
autocast makes, the activations each layer keeps for its backward
(:func:`layer_activation_bytes`, Korthikanti et al. 2022, counted from the block's shapes;
divided by ``cp``, plus the whole sequence's K and V the attention gathers under ``cp``:
:func:`gathered_kv_bytes`), times the micro-batches in flight under the schedule, the
logits, and 2 GB of buffers.

**Step time** of one optimizer step at the full global batch, in seconds: the matmuls at
``peak x gemm_efficiency`` plus the memory-bound kernels at HBM bandwidth (``compute``);
tensor-parallel collectives (``tp_comm``); context parallelism's K/V all-gathers and their
gradients' reduce-scatters, not overlapped (``cp_comm``); the schedule's bubble (``bubble``, :func:`pipeline_bubble`);
the stage-boundary sends (``pp_comm``); the data-parallel traffic not hidden behind the
backward (``dp_comm``); AdamW's memory traffic (``optimizer``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.config import ConfigError
from mtnlg.model.config import ModelConfig
from mtnlg.model.flops import flops_per_token, layer_parameters, norm_parameters
from mtnlg.plan.hardware import GB, GPU

BUFFER_BYTES = 2 * GB   # CUDA context, NCCL buffers, allocator slack
BF16, FP32 = 2, 4

# pipeline schedules, named as parallel.pp_schedule names them: 1F1B (interleaved when
# pp_virtual > 1), GPipe, and the zero-bubble schedules of torch.distributed.pipelining
# (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV), which split
# each backward into its input-gradient (B) and weight-gradient (W) passes
SCHEDULES = ("1f1b", "gpipe", "interleaved-zb", "zbv", "dualpipev")
V_SCHEDULES = ("zbv", "dualpipev")      # two chunks per rank in a V
RECOMPUTE = ("none", "selective", "full")
GRAD_SYNC = ("micro_batch", "step")


@dataclass(frozen=True)
class Layout:
    """One way to split a run: the degrees and the memory-saving choices. Names follow the
    trainer's ``parallel`` section (``pp_virtual``, ``pp_schedule``, ``activation_checkpoint``)."""

    tp: int
    pp: int
    dp: int
    cp: int = 1                           # context parallelism: K/V all-gathered over cp ranks
    pp_virtual: int = 1                   # model chunks per pipeline rank (> 1: interleaved)
    micro_batch_size: int = 1
    activation_checkpoint: str = "none"   # none | selective | full
    flash_attention: bool = True          # fused attention kernel (no s x s scores kept)
    fsdp: bool = False
    fsdp_grad_sync: str = "micro_batch"   # micro_batch | step (parallel.fsdp_grad_sync)
    sequence_parallel: bool = True        # only meaningful with tp > 1
    pp_schedule: str = "1f1b"             # one of SCHEDULES (pp > 1)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "cp", "pp_virtual", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"layout {name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("pp_schedule", SCHEDULES), ("activation_checkpoint", RECOMPUTE),
                              ("fsdp_grad_sync", GRAD_SYNC)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"layout {name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.pp_schedule in V_SCHEDULES and self.pp > 1 and self.pp_virtual != 2:
            raise ConfigError(f"pp_schedule={self.pp_schedule} runs exactly 2 model chunks per rank (a V); "
                              f"got pp_virtual={self.pp_virtual}")
        if self.pp_schedule == "interleaved-zb" and self.pp > 1 and self.pp_virtual < 2:
            raise ConfigError(f"pp_schedule=interleaved-zb runs virtual stages: pp_virtual >= 2, "
                              f"got {self.pp_virtual}")
        if self.pp_schedule == "gpipe" and self.pp_virtual > 1:
            raise ConfigError(f"pp_virtual={self.pp_virtual} needs an interleaving schedule "
                              f"(1f1b, interleaved-zb, zbv or dualpipev), not gpipe")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def schedule_name(self) -> str:
        """The schedule as people call it: interleaved 1F1B is 1f1b with virtual stages."""
        if self.pp == 1:
            return "none"
        if self.pp_schedule == "1f1b" and self.pp_virtual > 1:
            return "interleaved-1f1b"
        return self.pp_schedule

    def describe(self) -> str:
        parts = [f"tp{self.tp}"] + ([f"cp{self.cp}"] if self.cp > 1 else [])
        parts += [f"pp{self.pp}" + (f"x{self.pp_virtual}" if self.pp_virtual > 1 else ""),
                  f"dp{self.dp}", f"mb{self.micro_batch_size}"]
        return " ".join(parts)


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes."""

    global_batch_size: int
    seq_length: int


@dataclass(frozen=True)
class Memory:
    weights: float
    gradients: float
    optimizer: float
    weight_copies: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.weight_copies
                + self.activations + self.buffers)


@dataclass(frozen=True)
class StepTime:
    compute: float
    tp_comm: float
    cp_comm: float          # K/V all-gathers and their gradients' reduce-scatters (not overlapped)
    bubble: float
    pp_comm: float
    dp_comm: float          # exposed (not hidden behind the backward)
    optimizer: float
    bubble_fraction: float

    @property
    def total(self) -> float:
        return (self.compute + self.tp_comm + self.cp_comm + self.bubble + self.pp_comm
                + self.dp_comm + self.optimizer)


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    gpu: str
    memory: Memory
    time: StepTime
    micro_batches: int
    tokens_per_step: int
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    fits: bool
    peak_tflops: float

    @property
    def mfu(self) -> float:
        """Model FLOP/s as a share of the GPU's peak."""
        return self.model_tflops_per_gpu / self.peak_tflops

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.time.total

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.tokens_per_second / self.layout.world_size


def _stage_parameters(m: ModelConfig, lay: Layout) -> tuple[float, float, float]:
    """(first stage, last stage, one block) parameters on one rank, before any FSDP sharding."""
    t = lay.tp
    H, V = m.hidden_size, m.padded_vocab_size(t)
    block = layer_parameters(m) / t
    layers = m.num_layers / lay.pp * block
    emb = V * H / t + (m.seq_length * H if m.position == "learned" else 0)
    head = V * H / t + norm_parameters(m)
    if lay.pp == 1:
        one = layers + emb + (0 if m.tie_embeddings else V * H / t) + norm_parameters(m)
        return one, one, block
    # tied embeddings across stages: the last stage holds its own copy of the table
    return layers + emb, layers + head, block


def layer_activation_bytes(m: ModelConfig, lay: Layout, s: int) -> tuple[float, float]:
    """Bytes one transformer layer keeps for its backward, per micro-batch on one rank, with
    nothing recomputed: (activations, attention scores), for sequences of ``s`` tokens
    split over ``cp`` ranks.

    Korthikanti et al. 2022 (section 4.1) counted per token, in bf16: the attention block
    keeps its input (``2h``), Q, K and V (``2(h + 2 kv)``, ``kv`` the key/value width), the
    output projection's input (``2h``) and a dropout mask (``h``); the MLP its input
    (``2h``), the GeLU's input and output (``2f + 2f``; SwiGLU: gate, up, SiLU(gate) and
    their product, ``8f``) and a dropout mask (``h``); the two norms their inputs (``4h``).
    For the GPT block (``kv = h``, ``f = 4h``, dropout on) that is their ``34 h``. Without a
    fused attention kernel the scores add ``2as`` (softmax output) plus ``3as`` (the
    attention dropout's mask and output) per token. Tensor parallelism splits all of it
    except, without sequence parallelism, the norms' and the projections' inputs and the
    dropout masks (their ``10 h``)."""
    sl, b, h, a, t = s / lay.cp, lay.micro_batch_size, m.hidden_size, m.num_heads, lay.tp
    kv, f = m.kv_heads * m.head_dim, m.ffn_size
    masks = 2 * h if m.dropout > 0 else 0
    attention = 2 * h + 2 * (h + 2 * kv) + 2 * h
    mlp = 2 * h + (8 * f if m.activation == "swiglu" else 4 * f)
    per_token = attention + mlp + 4 * h + masks
    replicated = 0 if (lay.sequence_parallel or t == 1) else 4 * h + 2 * h + 2 * h + masks
    acts = sl * b * ((per_token - replicated) / t + replicated)
    scores = 0.0 if lay.flash_attention else sl * b * a * s * (2 + (3 if m.attention_dropout > 0 else 0)) / t
    return acts, scores


def gathered_kv_bytes(m: ModelConfig, lay: Layout, s: int) -> float:
    """Bytes of the whole sequence's K and V that the attention of one layer holds on one rank
    under context parallelism (``parallel.cp``'s all-gather form: K and V gathered from the cp
    ranks and repeated to every query head, bf16, kept by the attention for its backward),
    beyond this rank's own share; 0 without cp."""
    if lay.cp == 1:
        return 0.0
    return 2 * BF16 * lay.micro_batch_size * s * (1 - 1 / lay.cp) * m.hidden_size / lay.tp


def _kept_per_layer(m: ModelConfig, lay: Layout, s: int) -> tuple[float, float]:
    """(kept for the backward, peak of one layer being recomputed) per layer and micro-batch.
    The gathered K and V of context parallelism belong to the attention core: recomputed with
    it under selective and full recomputation, kept otherwise."""
    acts, scores = layer_activation_bytes(m, lay, s)
    gathered = gathered_kv_bytes(m, lay, s)
    sp = lay.sequence_parallel and lay.tp > 1
    if lay.activation_checkpoint == "full":
        return 2 * s / lay.cp * lay.micro_batch_size * m.hidden_size / (lay.tp if sp else 1), acts + scores + gathered
    if lay.activation_checkpoint == "selective":
        return acts, gathered
    return acts + scores + gathered, 0.0


def _in_flight(lay: Layout, n_micro: int) -> float:
    """Micro-batches whose activations the most loaded stage holds at once."""
    p, v = lay.pp, lay.pp_virtual
    if p == 1:
        return 1.0
    if lay.pp_schedule == "gpipe":
        return float(n_micro)
    if lay.pp_schedule == "dualpipev":
        return float(min(n_micro, p + 1))     # DeepSeek-V3 report, Table 2: PP + 1
    if v > 1 and lay.pp_schedule != "zbv":
        return min(float(n_micro), p * (1 + (p - 1) / (p * v)))
    return float(min(n_micro, p))     # 1F1B, and ZB-V (Qi et al. 2024: 1F1B's peak)


def pipeline_bubble(lay: Layout, micro: float, input_grad: float, weight_grad: float, n_micro: int) -> float:
    """Idle seconds per step on a pipeline rank, for a micro-batch that takes ``micro``
    seconds on a stage (F + B + W), ``input_grad`` of them the input gradients (B, with any
    recomputation) and ``weight_grad`` the weight gradients (W).

    * 1F1B, GPipe: ``(p-1)/v (F+B+W)`` (Narayanan et al. 2021, section 2.2);
    * interleaved-zb: ``(p-1)/v (F+B-W)``, ZB-H1's bubble (Qi et al. 2023, "Zero Bubble
      Pipeline Parallelism", Table 1), over ``v`` looped chunks;
    * zbv: ``u`` chunk passes of ``(F+B+W)/6`` each, ``u = max(p-1, 2(2p-1-m))`` for ``m``
      micro-batches; dualpipev (``m >= 2p``): ``p-1`` of them. These are the plans
      ``torch.distributed.pipelining`` runs, played with equal pass times
      (benchmarks/pipeline_bubble.py, exact for p = 2..8): they keep ``p-1`` start-up
      passes, where the ideal schedules' ``(p-1)(F+B-2W)`` (Qi et al. 2024, ZB-V) and
      ``(p-1)(F&B+B-3W)`` (DeepSeek-V3 report, Table 2) vanish at ``F = B = W``."""
    p, v = lay.pp, lay.pp_virtual
    if p == 1:
        return 0.0
    w, b = weight_grad, input_grad
    f = micro - b - w
    if lay.pp_schedule == "interleaved-zb":
        return (p - 1) / v * max(0.0, f + b - w)
    m = n_micro
    if lay.pp_schedule == "dualpipev" and m >= 2 * p:
        return (p - 1) * micro / 6
    if lay.pp_schedule in ("zbv", "dualpipev"):   # dualpipev with fewer than 2p runs zbv
        return max(p - 1, 2 * (2 * p - 1 - m)) * micro / 6
    return (p - 1) / v * micro


def _ring(bytes_: float, n: int, gbps: float, factor: float = 2.0) -> float:
    """Seconds for a ring collective over ``n`` GPUs moving ``factor (n-1)/n x bytes`` per
    GPU (2 for all-reduce, 1 for all-gather or reduce-scatter)."""
    if n <= 1:
        return 0.0
    return factor * (n - 1) / n * bytes_ / (gbps * GB)


def estimate(m: ModelConfig, lay: Layout, w: Workload, gpu: GPU) -> Estimate:
    t, p, d, v, b, c = lay.tp, lay.pp, lay.dp, lay.pp_virtual, lay.micro_batch_size, lay.cp
    s, h = w.seq_length, m.hidden_size
    n_micro = max(1, w.global_batch_size // (b * d))
    layers_per_rank = m.num_layers // p
    full_ac = lay.activation_checkpoint == "full"

    # ---- memory ---------------------------------------------------------------------
    first, last, block = _stage_parameters(m, lay)
    params = max(first, last)
    replicas = d * c                    # ranks holding the same weights
    shard = replicas if (lay.fsdp and replicas > 1) else 1
    gathered = 2 * block * BF16 if shard > 1 else 0.0
    weights = params * FP32 / shard + gathered
    reduce_once = p > 1 or lay.fsdp_grad_sync == "step"
    gradients = params * FP32 / (shard if (n_micro == 1 or not reduce_once) else 1)
    optimizer = params * 2 * FP32 / shard
    weight_copies = params * BF16 if p > 1 else block * BF16 * 2
    kept, recompute_peak = _kept_per_layer(m, lay, s)
    V = m.padded_vocab_size(t)
    tokens = b * s / c                  # tokens of one micro-batch on one rank
    logits = 10 * tokens * V / t
    activations = kept * layers_per_rank * _in_flight(lay, n_micro) + recompute_peak + logits
    buffers = BUFFER_BYTES + block * FP32
    memory = Memory(weights, gradients, optimizer, weight_copies, activations, buffers)

    # ---- time of one micro-batch on the bottleneck stage (the last, with the head) ------
    rate = gpu.peak_flops * gpu.gemm_efficiency * t      # FLOP/s of a tensor-parallel group
    f_weights = 2 * layer_parameters(m) * tokens         # forward matmuls, whole layer
    f_attn = 4 * s * h * tokens                          # scores and weighted sum
    recompute = {"full": f_weights + f_attn, "selective": f_attn, "none": 0.0}[lay.activation_checkpoint]
    head = 2 * V * h * tokens
    fwd = layers_per_rank * (f_weights + f_attn) + head
    bwd_input = layers_per_rank * (f_weights + 2 * f_attn + recompute) + head
    bwd_weight = layers_per_rank * f_weights + head
    # the memory-bound kernels between the matmuls (norms, activations, dropout, residual
    # adds, softmax without a fused kernel) stream what the layer keeps: written forward,
    # read back and its gradient written backward, once more when recomputed
    acts, scores = layer_activation_bytes(m, lay, s)
    passes = 3 + (1 if full_ac else 0)
    rescored = scores if lay.activation_checkpoint == "selective" else 0.0
    micro_memory = layers_per_rank * (passes * (acts + scores) + rescored) / (gpu.hbm_tbps * 1e12)
    micro_compute = (fwd + bwd_input + bwd_weight) / rate + micro_memory
    weight_grad = bwd_weight / rate
    input_grad = bwd_input / rate

    act_bytes = tokens * h * BF16
    ar_per_layer = 4 + (2 if full_ac else 0)
    micro_tp = layers_per_rank * ar_per_layer * _ring(act_bytes, t, gpu.nvlink_gbps) if t > 1 else 0.0

    micro_cp = 0.0
    if c > 1:
        # parallel.cp's all-gather form: each layer's forward gathers K and V from the cp
        # ranks (again when the attention core is recomputed), its backward reduce-scatters
        # their gradients; nothing overlaps them with compute
        cp_gbps = gpu.nvlink_gbps if t * c <= gpu.gpus_per_node else gpu.ib_gbps
        kv = 2 * tokens * m.kv_heads * m.head_dim / t * BF16            # this rank's K and V
        gathers = 1 + (1 if lay.activation_checkpoint in ("selective", "full") else 0)
        micro_cp = layers_per_rank * (gathers + 1) * _ring(c * kv, c, cp_gbps, factor=1.0)

    stage_ranks = t * c * d
    p2p_gbps = gpu.ib_gbps if stage_ranks >= gpu.gpus_per_node else gpu.nvlink_gbps
    p2p_bytes = act_bytes / t      # split over the tp ranks: sequence parallel, or Megatron's scatter/gather
    micro_pp = (2 * v * p2p_bytes / (p2p_gbps * GB)) if p > 1 else 0.0
    micro = micro_compute + micro_tp + micro_cp + micro_pp
    bubble = pipeline_bubble(lay, micro, input_grad, weight_grad, n_micro)
    busy = n_micro * micro
    bubble_fraction = bubble / (busy + bubble) if bubble else 0.0

    # ---- data parallelism and the optimizer ------------------------------------------
    dp_gbps = gpu.nvlink_gbps if stage_ranks <= gpu.gpus_per_node else gpu.ib_gbps
    grad_bytes = params * FP32
    if lay.fsdp and replicas > 1:
        reduces = 1 if reduce_once else n_micro
        dp_total = (2 * n_micro * _ring(params * BF16, replicas, dp_gbps, 1.0)
                    + reduces * _ring(grad_bytes, replicas, dp_gbps, 1.0))
        hidden = (2 * n_micro + reduces - 1) * micro_compute * 0.9   # prefetched / overlapped behind compute
    else:
        dp_total = _ring(grad_bytes, replicas, dp_gbps)
        hidden = 0.0
    hidden += micro_compute * 2 / (3 + (1 if full_ac else 0))    # the last backward
    dp_comm = max(0.0, dp_total - hidden)
    if p > 1 and m.tie_embeddings:
        dp_comm += _ring(V * h / t * FP32, 2, gpu.ib_gbps)
    optim = params / shard * 28 / (gpu.hbm_tbps * 1e12)
    time = StepTime(compute=n_micro * micro_compute, tp_comm=n_micro * micro_tp, cp_comm=n_micro * micro_cp,
                    bubble=bubble, pp_comm=n_micro * micro_pp, dp_comm=dp_comm, optimizer=optim,
                    bubble_fraction=bubble_fraction)

    step_tokens = w.global_batch_size * s
    model_flops = flops_per_token(m, t, s) * step_tokens
    hw_extra = {"full": (2 * layer_parameters(m) + 4 * s * h) * m.num_layers,
                "selective": 4 * s * h * m.num_layers, "none": 0.0}[lay.activation_checkpoint]
    hw_flops = model_flops + hw_extra * step_tokens
    n_gpus = lay.world_size
    total = time.total
    return Estimate(layout=lay, gpu=gpu.name, memory=memory, time=time, micro_batches=n_micro,
                    tokens_per_step=step_tokens,
                    model_tflops_per_gpu=model_flops / total / n_gpus / 1e12,
                    hardware_tflops_per_gpu=hw_flops / total / n_gpus / 1e12,
                    fits=memory.total <= gpu.memory_bytes, peak_tflops=gpu.peak_tflops)
