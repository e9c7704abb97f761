"""The GPU kinds the planner knows, each constant declared once, with where it comes from.

Peaks and memory are the vendors' published figures. The link bandwidths are the bus
bandwidths NCCL's own benchmark (``nccl-tests``, ``all_reduce_perf``) reports for large
messages on those systems: what a ring collective actually sustains, not the wire rate.
``gemm_efficiency`` is the share of the peak that a transformer layer's matrix work
sustains inside a real training step: the GEMMs and the memory-bound kernels between them
(norms, GeLU, dropout, softmax, residual adds) and launch gaps. It is the one constant
per GPU kind that is not a datasheet figure:

* **A100: 0.50.** One number for the whole MT-NLG table (Smith et al. 2022, Table 1: 530B
  on 280, 350 and 420 DGX A100 nodes): with the bubble and the communication terms
  modelled, the three rows imply 0.50-0.52 one by one, and the drop in throughput from row to
  row comes from the model (bubble, data-parallel traffic), not from this constant. It
  lies in the range of Megatron-LM's largest A100 runs (Narayanan et al. 2021, Table 1:
  44-52% of peak end to end, bubble and communication included).
  ``tests/test_plan.py`` holds the table to +-10% on every row.
* **H100 / H200: 0.45.** Megatron-LM reports 47% of peak (MFU) for GPT models on H100
  clusters end to end; H100s need more work per kernel to stay busy, so the share is
  lower than the A100's. Not checked against a published table here;
  ``benchmarks/gpu_check.sh`` measures a single GPU's GEMM rate and MFU.

Every figure is per GPU. ``ib_gbps`` is the inter-node bandwidth one GPU has to itself:
DGX A100 nodes have one 200 Gb/s HDR InfiniBand adapter per GPU (25 GB/s), DGX H100/H200
nodes one 400 Gb/s NDR adapter per GPU (50 GB/s); NCCL's rail-aligned rings reach about
90% of it (the figures below).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.config import ConfigError

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float        # dense bf16 tensor-core peak, TFLOP/s
    memory_gb: float          # HBM capacity, GB (10^9 bytes)
    hbm_tbps: float           # HBM bandwidth, TB/s
    nvlink_gbps: float        # NCCL all-reduce bus bandwidth inside a node, GB/s
    ib_gbps: float            # NCCL bus bandwidth across nodes, per GPU, GB/s
    gpus_per_node: int
    gemm_efficiency: float    # sustained share of peak for the model's matrix work

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
    "a100-80g": GPU("a100-80g", 312.0, 80.0, 2.04, 230.0, 22.5, 8, 0.50),
    # H100 SXM5 80 GB: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3 (H100 datasheet); DGX H100:
    # NVLink 4 (900 GB/s per GPU both ways), ~360 GB/s all-reduce bus bandwidth; 8 x NDR 400 Gb/s.
    "h100": GPU("h100", 989.0, 80.0, 3.35, 360.0, 45.0, 8, 0.45),
    # H200 SXM 141 GB: the H100's compute and links, 4.8 TB/s HBM3e (H200 datasheet).
    "h200": GPU("h200", 989.0, 141.0, 4.8, 360.0, 45.0, 8, 0.45),
}


def get_gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ConfigError(f"unknown GPU kind {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


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
