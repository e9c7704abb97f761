"""What ``mtnlg plan`` prints: the table, the one-layout breakdown and the ``--json``
document, whose field names are a stable interface (``JSON_FIELDS``, docs/plan.md).

A field is added, never renamed or removed, without changing ``SCHEMA``.
"""

from __future__ import annotations

from mtnlg.plan.estimate import Estimate
from mtnlg.plan.hardware import GB

SCHEMA = "mtnlg.plan/1"

# top level of the document
TOP_FIELDS = ("schema", "mode", "gpu", "gpus", "nodes", "gpus_per_node", "parameters", "seq_length",
              "global_batch", "estimate", "problem", "fitting", "too_big", "invalid")
# one layout's estimate (the items of "fitting", and "estimate")
ESTIMATE_FIELDS = ("layout", "memory", "time", "bubble_fraction", "micro_batches", "tokens_per_step",
                   "tokens_per_second", "tokens_per_second_per_gpu", "model_tflops_per_gpu",
                   "hardware_tflops_per_gpu", "mfu", "peak_tflops", "fits", "runs_in_trainer", "trainer_gap")
LAYOUT_FIELDS = ("tp", "pp", "dp", "cp", "pp_virtual", "pp_schedule", "schedule", "micro_batch_size",
                 "activation_checkpoint", "flash_attention", "fsdp", "fsdp_grad_sync", "sequence_parallel")
MEMORY_FIELDS = ("weights", "gradients", "optimizer", "weight_copies", "activations", "buffers", "total")
TIME_FIELDS = ("compute", "tp_comm", "cp_comm", "bubble", "pp_comm", "dp_comm", "optimizer", "total")


def estimate_json(e: Estimate, trainer_gap: str | None) -> dict:
    lay, m, t = e.layout, e.memory, e.time
    layout = {k: getattr(lay, k) for k in LAYOUT_FIELDS if k != "schedule"}
    layout["schedule"] = lay.schedule_name
    return {
        "layout": {k: layout[k] for k in LAYOUT_FIELDS},
        "memory": {**{k: getattr(m, k) for k in MEMORY_FIELDS if k != "total"}, "total": m.total},
        "time": {**{k: getattr(t, k) for k in TIME_FIELDS if k != "total"}, "total": t.total},
        "bubble_fraction": t.bubble_fraction,
        "micro_batches": e.micro_batches,
        "tokens_per_step": e.tokens_per_step,
        "tokens_per_second": e.tokens_per_second,
        "tokens_per_second_per_gpu": e.tokens_per_second_per_gpu,
        "model_tflops_per_gpu": e.model_tflops_per_gpu,
        "hardware_tflops_per_gpu": e.hardware_tflops_per_gpu,
        "mfu": e.mfu,
        "peak_tflops": e.peak_tflops,
        "fits": e.fits,
        "runs_in_trainer": trainer_gap is None,
        "trainer_gap": trainer_gap,
    }


def dp_mode(lay) -> str:
    if not lay.fsdp:
        return "ddp"
    return "fsdp" if lay.fsdp_grad_sync == "micro_batch" or lay.pp > 1 else "fsdp-step"


HEADER = ["#", "tp", "cp", "pp", "dp", "mb", "schedule", "recompute", "dp-mode", "mem GB", "step s",
          "bubble %", "tokens/s", "model TF/s", "hw TF/s", "MFU %"]


def table_row(rank: int, e: Estimate, trainer_gap: str | None) -> list[str]:
    lay, t, mem = e.layout, e.time, e.memory
    return [str(rank) + ("*" if trainer_gap else ""), str(lay.tp), str(lay.cp),
            f"{lay.pp}" + (f"x{lay.pp_virtual}" if lay.pp_virtual > 1 else ""),
            str(lay.dp), str(lay.micro_batch_size), lay.schedule_name,
            lay.activation_checkpoint + ("" if lay.flash_attention else " nf"), dp_mode(lay),
            f"{mem.total / GB:.1f}", f"{t.total:.3f}", f"{100 * t.bubble_fraction:.1f}",
            f"{e.tokens_per_second:,.0f}", f"{e.model_tflops_per_gpu:.0f}",
            f"{e.hardware_tflops_per_gpu:.0f}", f"{100 * e.mfu:.1f}"]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(HEADER, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def describe_memory(e: Estimate) -> str:
    m = e.memory
    parts = [("weights", m.weights), ("grads", m.gradients), ("optimizer", m.optimizer),
             ("bf16 copies", m.weight_copies), ("activations", m.activations), ("buffers", m.buffers)]
    return ", ".join(f"{k} {v / GB:.1f}" for k, v in parts) + f" = {m.total / GB:.1f} GB"


def describe_time(e: Estimate) -> str:
    t = e.time
    return (f"step {t.total:.3f} s = compute {t.compute:.3f} + tp {t.tp_comm:.3f} + cp {t.cp_comm:.3f} + bubble "
            f"{t.bubble:.3f} + pp {t.pp_comm:.3f} + dp {t.dp_comm:.3f} + optimizer {t.optimizer:.3f}")
