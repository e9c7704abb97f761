"""``mtnlg plan``: rank every valid layout of a model on N GPUs by predicted step time.

    mtnlg plan --preset mtnlg-530b --gpus 2240 --gpu a100-80g --global-batch 1920 --tp 8 --pp 35
    mtnlg plan --preset mtnlg-1.3b --gpus 8 --gpu h100 --global-batch 512
    mtnlg plan model.num_layers=48 model.hidden_size=6144 model.num_heads=48 --gpus 64 --gpu h200 --json

The model is a preset, a preset with ``model.KEY=VALUE`` overrides, or overrides alone
(over the default ``ModelConfig``); ``--seq`` sets its sequence length. The table shows
the fastest layouts that fit in the GPU's memory with their per-GPU memory, step time,
bubble, throughput and FLOP/s; ``--json`` prints every fitting layout with every term of
its estimate. Exit code 1 when no layout fits.
"""

from __future__ import annotations

import argparse
import json

from mtnlg.config import ConfigError, load_config, to_dict
from mtnlg.model.config import ModelConfig
from mtnlg.plan.hardware import GB, GPUS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="model preset (mtnlg.model.presets), e.g. mtnlg-530b")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU kind (default h100)")
    parser.add_argument("--global-batch", type=int, default=512, help="sequences per optimizer step (default 512)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    parser.add_argument("--tp", type=int, default=None, help="pin the tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=None, help="pin the pipeline-parallel degree")
    parser.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    parser.add_argument("--json", action="store_true", help="print every fitting layout as JSON")
    parser.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE", help="model overrides")


def model_from_args(preset: str | None, overrides: list[str], seq: int | None) -> ModelConfig:
    from mtnlg.model.presets import get_preset

    keys = []
    for o in overrides:
        if not o.startswith("model."):
            raise ConfigError(f"{o}: mtnlg plan takes model.KEY=VALUE overrides only")
        keys.append(o[len("model."):])
    if seq is not None:
        keys.append(f"seq_length={seq}")
    base = to_dict(get_preset(preset)) if preset else {}
    return load_config(ModelConfig, None, keys, base=base)


def _dp_mode(lay) -> str:
    if not lay.fsdp:
        return "ddp"
    return "fsdp" if lay.fsdp_grad_sync == "micro_batch" or lay.pp > 1 else "fsdp-step"


def _row(rank: int, e) -> list[str]:
    lay, t, mem = e.layout, e.time, e.memory
    return [str(rank), str(lay.tp), f"{lay.pp}" + (f"x{lay.virtual_stages}" if lay.virtual_stages > 1 else ""),
            str(lay.dp), str(lay.micro_batch_size), lay.activation_checkpoint, _dp_mode(lay),
            f"{mem.total / GB:.1f}", f"{t.total:.3f}", f"{100 * t.bubble_fraction:.1f}",
            f"{e.tokens_per_step / t.total:,.0f}", f"{e.model_tflops_per_gpu:.0f}",
            f"{e.hardware_tflops_per_gpu:.0f}", f"{100 * e.mfu:.1f}"]


HEADER = ["#", "tp", "pp", "dp", "mb", "recompute", "dp-mode", "mem GB", "step s", "bubble %",
          "tokens/s", "model TF/s", "hw TF/s", "MFU %"]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(HEADER, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def describe_memory(e) -> str:
    m = e.memory
    parts = [("weights", m.weights), ("grads", m.gradients), ("optimizer", m.optimizer),
             ("bf16 copies", m.weight_copies), ("activations", m.activations), ("buffers", m.buffers)]
    return ", ".join(f"{k} {v / GB:.1f}" for k, v in parts) + f" = {m.total / GB:.1f} GB"


def main(args: argparse.Namespace) -> int:
    from mtnlg.model.flops import count_parameters
    from mtnlg.plan.estimate import Workload
    from mtnlg.plan.hardware import get_gpu
    from mtnlg.plan.search import plan

    model = model_from_args(args.preset, list(args.overrides), args.seq)
    gpu = get_gpu(args.gpu)
    if args.global_batch < 1:
        raise ConfigError(f"--global-batch must be >= 1, got {args.global_batch}")
    result = plan(model, args.gpus, gpu, Workload(args.global_batch, model.seq_length), tp=args.tp, pp=args.pp)
    if args.json:
        print(json.dumps({"gpus": args.gpus, "gpu": gpu.name, "global_batch": args.global_batch,
                          "seq_length": model.seq_length, "parameters": count_parameters(model),
                          "fitting": [e.as_dict() for e in result.fitting],
                          "too_big": len(result.too_big), "invalid": dict(result.invalid)}, indent=1))
        return 0 if result.fitting else 1
    n = count_parameters(model)
    print(f"{n / 1e9:.2f}B parameters, seq {model.seq_length}, global batch {args.global_batch}, "
          f"{args.gpus} x {gpu.name} ({gpu.peak_tflops:.0f} TFLOP/s bf16 at {gpu.gemm_efficiency:.0%}, "
          f"{gpu.memory_gb:.0f} GB)")
    print(f"{len(result.fitting)} layouts fit, {len(result.too_big)} valid but over {gpu.memory_gb:.0f} GB, "
          f"{sum(result.invalid.values())} refused by the layout rules")
    if not result.fitting:
        if result.too_big:
            e = result.too_big[0]
            print(f"smallest: {e.layout.describe()} {e.layout.activation_checkpoint} "
                  f"{_dp_mode(e.layout)}: {describe_memory(e)}")
        for reason, count in result.invalid.most_common(3):
            print(f"  {count} x {reason}")
        return 1
    print(format_table([_row(i + 1, e) for i, e in enumerate(result.fitting[:args.top])]))
    best = result.best
    print(f"best: {best.layout.describe()}: {describe_memory(best)}; step {best.time.total:.3f} s = compute "
          f"{best.time.compute:.3f} + tp {best.time.tp_comm:.3f} + bubble {best.time.bubble:.3f} + pp "
          f"{best.time.pp_comm:.3f} + dp {best.time.dp_comm:.3f} + optimizer {best.time.optimizer:.3f}")
    return 0
