"""Per-GPU memory and step time of one training layout, from the model's sizes alone.

``estimate(model, layout, workload, gpu)`` -> :class:`Estimate`. Nothing is built or run:
it is arithmetic on the :class:`~mtnlg.model.config.ModelConfig`, the layout and the
declared constants of the GPU kind (``mtnlg.plan.hardware``). The pieces, each a named
field of the result so that a reader can check any one of them:

**Memory** of the most loaded rank (pipeline stage 0, or the last stage when the output
layer outweighs the embeddings), in bytes, for the trainer as it is: fp32 parameters,
bf16 autocast, AdamW.

* weights 4 B/parameter, gradients 4 B, AdamW's two moments 8 B. FSDP shards all three
  over the data-parallel ranks, except that gradients accumulated over several
  micro-batches stay unsharded until the last one with ``parallel.fsdp_grad_sync=step``
  or under pipeline parallelism (torch's schedule reduces once per step); FSDP also holds
  two gathered blocks (the one running and the one prefetched), in bf16 (its
  ``MixedPrecisionPolicy`` on a bf16 run).
* the bf16 copies autocast makes of the weights (2 B/parameter; under pipeline parallelism
  the whole schedule runs in one autocast region, so they live for the step).
* activations from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", Table 2), per layer and micro-batch of ``b`` sequences of ``s``
  tokens, hidden ``h``, ``a`` heads, ``t``-way tensor parallelism:
  ``sbh (34/t + 5as/(ht))`` with sequence parallelism, ``sbh (10 + 24/t + 5as/(ht))``
  without; the ``5as/h`` attention-matrix term is gone with a fused (flash) attention
  kernel or selective recomputation; full recomputation keeps only each layer's input
  (``2sbh/t``) plus one layer's activations while it is recomputed. The output layer
  adds ``10 sbv/t`` (bf16 logits, fp32 loss and its gradient).
  Micro-batches in flight: 1 without pipelining, ``p`` on the first stage under 1F1B,
  ``p (1 + (p-1)/(p v))`` under interleaved 1F1B with ``v`` virtual stages, all of them
  under GPipe.
* buffers: 2 GB for the CUDA context, NCCL's buffers and the allocator's slack, plus one
  block's gradients for the data-parallel reduction.

**Step time** of one optimizer step at the full global batch, in seconds:

* compute: the bottleneck stage's FLOPs per micro-batch (forward 2 FLOPs per weight per
  token plus attention's ``4sh`` per layer; backward twice that; recomputation again the
  forward of what is recomputed) / (peak x ``gemm_efficiency``) / ``t``;
* tensor-parallel collectives: ``b s h`` bf16 activations, two all-reduces' worth (with
  sequence parallelism: all-gathers + reduce-scatters of the same volume) per layer
  forward, two backward, two more per full recomputation, over NVLink, not overlapped;
* pipeline: ``(m + (p-1)/v)`` micro-batch times for ``m`` micro-batches, i.e. the bubble
  fraction ``(p-1)/(v m + p-1)``, plus the point-to-point sends of each micro-batch's
  stage-boundary activations (``b s h`` bf16, split over the tensor-parallel ranks with
  sequence parallelism) forward and backward, ``v`` times over, over InfiniBand when a
  stage spans a node;
* data parallelism: DDP all-reduces fp32 gradients (``2 (d-1)/d`` of them per GPU), FSDP
  all-gathers bf16 parameters for forward and backward of every micro-batch and
  reduce-scatters fp32 gradients after each micro-batch (``fsdp_grad_sync=micro_batch``)
  or once (``step``, and under pipelining), over NVLink when the data-parallel group fits in a
  node, else InfiniBand; only the last micro-batch's backward hides the gradient reduction;
  with tied embeddings across stages, one all-reduce of the embedding's gradient between
  the first and the last stage;
* optimizer: AdamW reads and writes 28 B per local parameter at HBM bandwidth.

Model FLOP/s count ``6N + 12LHT`` per token (``mtnlg.model.flops``); hardware FLOP/s add the
recomputed forward, as the MT-NLG and Megatron-LM papers report them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mtnlg.model.config import ModelConfig
from mtnlg.model.flops import norm_parameters, flops_per_token, layer_parameters
from mtnlg.plan.hardware import GB, GPU

BUFFER_BYTES = 2 * GB   # CUDA context, NCCL buffers, allocator slack
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Layout:
    """One way to split a run: the degrees and the memory-saving choices."""

    tp: int
    pp: int
    dp: int
    virtual_stages: int = 1        # v > 1: interleaved 1F1B
    micro_batch_size: int = 1
    activation_checkpoint: str = "none"   # none | selective | full
    fsdp: bool = False
    fsdp_grad_sync: str = "micro_batch"   # micro_batch | step (parallel.fsdp_grad_sync)
    sequence_parallel: bool = True        # only meaningful with tp > 1
    pp_schedule: str = "1f1b"             # 1f1b | gpipe (pp > 1)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}" + (f"x{self.virtual_stages}" if self.virtual_stages > 1 else ""),
                 f"dp{self.dp}", f"mb{self.micro_batch_size}"]
        return " ".join(parts)


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes."""

    global_batch_size: int
    seq_length: int
    flash_attention: bool = True    # fused attention (SDPA's flash/efficient kernels on GPU)


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
    bubble: float
    pp_comm: float
    dp_comm: float          # exposed (not hidden behind the last backward)
    optimizer: float
    bubble_fraction: float

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.bubble + self.pp_comm + self.dp_comm + self.optimizer


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

    def as_dict(self) -> dict:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        d["time"]["total"] = self.time.total
        d["mfu"] = self.mfu
        return d


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


def _activation_bytes_per_layer(m: ModelConfig, lay: Layout, w: Workload) -> tuple[float, float]:
    """(kept for the backward, peak of one layer being recomputed) per layer and micro-batch."""
    s, b, h, a, t = w.seq_length, lay.micro_batch_size, m.hidden_size, m.num_heads, lay.tp
    sp = lay.sequence_parallel and t > 1
    base = 34 / t if sp else (10 + 24 / t if t > 1 else 34)
    attn = 5 * a * s / (h * t)
    full_layer = s * b * h * (base + (0 if w.flash_attention else attn))
    if lay.activation_checkpoint == "full":
        return 2 * s * b * h / (t if sp else 1), full_layer
    if lay.activation_checkpoint == "selective":
        return s * b * h * base, 0.0
    return full_layer, 0.0


def _in_flight(lay: Layout, n_micro: int) -> float:
    """Micro-batches whose activations the most loaded stage holds at once."""
    p, v = lay.pp, lay.virtual_stages
    if p == 1:
        return 1.0
    if lay.pp_schedule == "gpipe":
        return float(n_micro)
    if v > 1:
        return min(float(n_micro), p * (1 + (p - 1) / (p * v)))
    return float(min(n_micro, p))


def _ring(bytes_: float, n: int, gbps: float, factor: float = 2.0) -> float:
    """Seconds for a ring collective over ``n`` GPUs moving ``factor (n-1)/n x bytes`` per
    GPU (2 for all-reduce, 1 for all-gather or reduce-scatter)."""
    if n <= 1:
        return 0.0
    return factor * (n - 1) / n * bytes_ / (gbps * GB)


def estimate(m: ModelConfig, lay: Layout, w: Workload, gpu: GPU) -> Estimate:
    t, p, d, v, b = lay.tp, lay.pp, lay.dp, lay.virtual_stages, lay.micro_batch_size
    s, h = w.seq_length, m.hidden_size
    n_micro = w.global_batch_size // (b * d)
    layers_per_rank = m.num_layers // p

    # ---- memory ---------------------------------------------------------------------
    first, last, block = _stage_parameters(m, lay)
    params = max(first, last)
    shard = d if (lay.fsdp and d > 1) else 1
    gathered = 2 * block * BF16 if shard > 1 else 0.0
    weights = params * FP32 / shard + gathered
    reduce_once = lay.pp > 1 or lay.fsdp_grad_sync == "step"
    gradients = params * FP32 / (shard if (n_micro == 1 or not reduce_once) else 1)
    optimizer = params * 2 * FP32 / shard
    weight_copies = params * BF16 if p > 1 else block * BF16 * 2
    kept, recompute_peak = _activation_bytes_per_layer(m, lay, w)
    V = m.padded_vocab_size(t)
    logits = 10 * s * b * V / t
    activations = kept * layers_per_rank * _in_flight(lay, n_micro) + recompute_peak + logits
    buffers = BUFFER_BYTES + block * FP32
    memory = Memory(weights, gradients, optimizer, weight_copies, activations, buffers)

    # ---- time -----------------------------------------------------------------------
    peak = gpu.peak_flops * gpu.gemm_efficiency
    tokens = b * s
    layer_fwd = (2 * layer_parameters(m) + 4 * s * h) * tokens            # FLOPs, whole layer
    recompute = {"full": layer_fwd, "selective": 4 * s * h * tokens, "none": 0.0}[lay.activation_checkpoint]
    layer_step = 3 * layer_fwd + recompute
    head_step = 3 * 2 * V * h * tokens
    stage_flops = layers_per_rank * layer_step + head_step      # the bottleneck: the last stage, with the head
    micro_compute = stage_flops / t / peak
    act_bytes = tokens * h * BF16
    ar_per_layer = 4 + (2 if lay.activation_checkpoint == "full" else 0)
    micro_tp = layers_per_rank * ar_per_layer * _ring(act_bytes, t, gpu.nvlink_gbps) if t > 1 else 0.0
    stage_ranks = t * d
    p2p_gbps = gpu.ib_gbps if stage_ranks >= gpu.gpus_per_node else gpu.nvlink_gbps
    p2p_bytes = act_bytes / (t if lay.sequence_parallel and t > 1 else 1)
    micro_pp = (2 * v * p2p_bytes / (p2p_gbps * GB)) if p > 1 else 0.0
    micro = micro_compute + micro_tp + micro_pp
    compute = n_micro * micro_compute
    tp_comm = n_micro * micro_tp
    pp_comm = n_micro * micro_pp
    bubble = (p - 1) / v * micro if p > 1 else 0.0
    bubble_fraction = (p - 1) / (v * n_micro + p - 1) if p > 1 else 0.0

    dp_gbps = gpu.nvlink_gbps if stage_ranks <= gpu.gpus_per_node else gpu.ib_gbps
    grad_bytes = params * FP32
    if lay.fsdp and d > 1:
        reduces = 1 if reduce_once else n_micro
        dp_total = (2 * n_micro * _ring(params * BF16, d, dp_gbps, 1.0)
                    + reduces * _ring(grad_bytes, d, dp_gbps, 1.0))
        hidden = (2 * n_micro + reduces - 1) * micro_compute * 0.9   # prefetched / overlapped behind compute
    else:
        dp_total = _ring(grad_bytes, d, dp_gbps)
        hidden = 0.0
    hidden += micro_compute * 2 / (3 + (1 if lay.activation_checkpoint == "full" else 0))
    dp_comm = max(0.0, dp_total - hidden)
    if p > 1 and m.tie_embeddings:
        dp_comm += _ring(V * h / t * FP32, 2, gpu.ib_gbps)
    optim = params / shard * 28 / (gpu.hbm_tbps * 1e12)
    time = StepTime(compute, tp_comm, bubble, pp_comm, dp_comm, optim, bubble_fraction)

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
