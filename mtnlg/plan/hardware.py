"""The GPU kinds the planner knows, each constant declared once, with where it comes from.

Declared from datasheets (never fitted): peaks and memory are the vendors' published
figures; the link bandwidths are the bus bandwidths NCCL's own benchmark (``nccl-tests``,
``all_reduce_perf``) reports for large messages on those systems, what a ring collective
sustains, not the wire rate. Every figure is per GPU. ``ib_gbps`` is the inter-node
bandwidth one GPU has to itself: DGX A100 nodes have one 200 Gb/s HDR InfiniBand adapter
per GPU (25 GB/s), DGX H100/H200 nodes one 400 Gb/s NDR adapter per GPU (50 GB/s); NCCL's
rail-aligned rings reach about 90% of it.

**Fitted**: ``gemm_efficiency``, the share of the bf16 peak that the model's matrix work
sustains inside a real training step (cuBLAS on the shapes a step runs, launch gaps; the
memory-bound kernels between the matmuls are modelled apart, at HBM bandwidth). It depends
on the kernels as much as on the chip, so it is declared per GPU kind and software stack,
each value fitted on ONE published run (``mtnlg.plan.published``, ``fitted=True``; the
test ``tests/test_plan_published.py`` refits it and checks the value here):

* stack ``torch`` (PyTorch-native training: bf16 autocast, SDPA's flash kernels, FSDP2,
  as mtnlg's trainer and torchtitan run), the default:
  - ``a100-80g``: 0.620, fitted on torchtitan's Llama 2 13B, FSDP on 64 A100s, no
    recomputation (``docs/performance.md``): the run with neither recomputation nor
    pipelining, the cleanest measure of the matmul rate;
  - ``h100-96g``: 0.379, fitted on torchtitan's Llama 3.1 8B, FSDP on 8 GPUs (one host:
    no inter-node traffic), ``benchmarks/llama3_h100_202412_torchtitan.md`` Table 1;
  - ``h100``, ``h200`` (DGX, 700 W): 0.45, an assumption, neither fitted nor validated: no
    published bf16 run on DGX H100 with its layout was found (Megatron-Bridge's DGX-H100
    rows are all FP8, which the planner does not model). The 500 W ``h100-96g`` value is a
    lower bound for it.
* stack ``megatron-2021`` (Megatron-LM as of 2021: fp16, fused softmax, no flash
  attention), for the SC21 and MT-NLG runs:
  - ``a100-80g``: 0.567, fitted on SC21 Table 1's 18.4B row (the largest model without
    pipeline parallelism: compute and tensor-parallel traffic only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mtnlg.config import ConfigError

GB = 1e9
TB = 1e12

STACKS = ("torch", "megatron-2021")


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float        # dense bf16 tensor-core peak, TFLOP/s (datasheet)
    memory_gb: float          # HBM capacity, GB (10^9 bytes) (datasheet)
    hbm_tbps: float           # HBM bandwidth, TB/s (datasheet)
    nvlink_gbps: float        # NCCL all-reduce bus bandwidth inside a node, GB/s
    ib_gbps: float            # NCCL bus bandwidth across nodes, per GPU, GB/s
    gpus_per_node: int
    gemm_efficiency: float    # FITTED: sustained share of the peak for the matmuls (stack "torch")

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * TB

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * GB


GPUS: dict[str, GPU] = {
    # A100 SXM4 80 GB: 312 TFLOP/s bf16 dense, 2.04 TB/s HBM2e (NVIDIA A100 datasheet);
    # DGX A100: NVLink 3 (600 GB/s per GPU both ways), ~230 GB/s all-reduce bus bandwidth;
    # 8 x HDR 200 Gb/s.
    "a100-80g": GPU("a100-80g", 312.0, 80.0, 2.04, 230.0, 22.5, 8, 0.620),
    # H100 SXM5 80 GB: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3 (H100 datasheet); DGX H100:
    # NVLink 4 (900 GB/s per GPU both ways), ~360 GB/s all-reduce bus bandwidth; 8 x NDR 400 Gb/s.
    "h100": GPU("h100", 989.0, 80.0, 3.35, 360.0, 45.0, 8, 0.45),
    # H200 SXM 141 GB: the H100's compute and links, 4.8 TB/s HBM3e (H200 datasheet).
    "h200": GPU("h200", 989.0, 141.0, 4.8, 360.0, 45.0, 8, 0.45),
    # H100 with 96 GB HBM2e (2.4 TB/s) at a 500 W power cap on Meta's Grand Teton hosts, the
    # machine of torchtitan's published benchmarks: NVLink 4 inside the host, 400 Gb/s RDMA
    # per GPU. Its bf16 peak is not published (torchtitan: "between SXM and NVL"); the SXM
    # figure is declared, as torchtitan's own MFU uses, and the fitted efficiency absorbs the cap.
    "h100-96g": GPU("h100-96g", 989.0, 96.0, 2.4, 360.0, 45.0, 8, 0.379),
}

# FITTED: gemm_efficiency of other software stacks, by GPU kind (the module docstring says
# which run each was fitted on)
STACK_EFFICIENCY: dict[str, dict[str, float]] = {
    "megatron-2021": {"a100-80g": 0.567},
}


def get_gpu(name: str, stack: str = "torch") -> GPU:
    """The GPU kind ``name`` with the ``gemm_efficiency`` fitted for software ``stack``."""
    if name not in GPUS:
        raise ConfigError(f"unknown GPU kind {name!r}; known: {', '.join(GPUS)}")
    if stack == "torch":
        return GPUS[name]
    if stack not in STACKS:
        raise ConfigError(f"unknown software stack {stack!r}; known: {', '.join(STACKS)}")
    fitted = STACK_EFFICIENCY[stack]
    if name not in fitted:
        raise ConfigError(f"no gemm_efficiency is fitted for {name} under the {stack} stack; "
                          f"fitted: {', '.join(fitted)}")
    return replace(GPUS[name], gemm_efficiency=fitted[name])


def gpu_for_device_name(device_name: str) -> GPU | None:
    """The planner's GPU for ``torch.cuda.get_device_name()`` (None when it has no entry)."""
    n = device_name.upper()
    if "H200" in n:
        return GPUS["h200"]
    if "H100" in n:
        return GPUS["h100"]
    if "A100" in n and "80" in n:
        return GPUS["a100-80g"]
    return None
