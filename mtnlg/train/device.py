"""The device a run trains on: which one, in which precision, and its peak for MFU."""

from __future__ import annotations

import torch

from mtnlg.config import ConfigError

# Dense bf16/fp16 tensor-core peaks (TFLOP/s per device) and TF32 for fp32 runs.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but no CUDA device is available")
    return name


# Float8 tensor cores: Ada (8.9: L4, L40S) and Hopper (9.0: H100, H200) onwards.
FP8_MIN_CAPABILITY = (8, 9)


def check_dtype_supported(dtype: str, device_type: str) -> None:
    """Refuse ``train.dtype=fp8`` where it cannot run, before any process group or model:
    without CUDA, on a GPU below compute capability 8.9, or without torchao (the fp8 extra)."""
    if dtype != "fp8":
        return
    need = "a GPU with float8 tensor cores, compute capability 8.9 or newer (Ada: L4, L40S; Hopper: H100, H200)"
    if device_type != "cuda":
        raise ConfigError(f"train.dtype=fp8 needs {need}; found no CUDA device (this run would train on the "
                          f"CPU); use train.dtype=fp32 or bf16")
    capability = torch.cuda.get_device_capability()
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise ConfigError(f"train.dtype=fp8 needs {need}; found {torch.cuda.get_device_name()} (compute capability "
                          f"{capability[0]}.{capability[1]}); use train.dtype=bf16")
    from mtnlg.parallel.float8 import require_torchao

    require_torchao()


def resolve_dtype(name: str, device_type: str) -> str:
    if name != "auto":
        return name
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def device_peak_tflops(device_type: str, dtype: str) -> float | None:
    """The device's dense peak for ``dtype``, or None when unknown (CPUs, other GPUs). An
    fp8 run's MFU is against the bf16 peak: attention, the head and the norms stay bf16, and
    the figure then compares with a bf16 run's."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get("bf16" if dtype == "fp8" else dtype)
    return None


def torch_device(device_type: str, local_rank: int) -> torch.device:
    """This process's device: its local GPU, or the CPU."""
    return torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")


def enable_tf32(device_type: str) -> None:
    """fp32 matmuls on tensor cores (TF32), as Megatron and torchtitan run them."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
