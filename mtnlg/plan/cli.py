"""``mtnlg plan``: the memory and step time of one layout, or every valid layout ranked.

    mtnlg plan --preset mtnlg-530b --gpus 2240 --gpu a100-80g --global-batch 1920 --tp 8 --pp 35
    mtnlg plan --preset mtnlg-1.3b --nodes 1 --gpu h100 --global-batch 512
    mtnlg plan --preset mtnlg-530b --gpus 2240 --gpu a100-80g --global-batch 1920 --tp 8 --pp 35 --cp 1 \\
        --pp-virtual 3 --pp-schedule 1f1b --micro-batch-size 1 --activation-checkpoint full \\
        --no-flash-attention --no-fsdp

The model is a preset, a preset with ``model.KEY=VALUE`` overrides, or overrides alone
(over the default ``ModelConfig``); ``--seq`` sets its sequence length. Every layout choice
has an option; when all of them are given (``--dp`` may follow from the GPU count) the
command evaluates that one layout and prints every term of its estimate, otherwise it walks
the free choices and ranks the layouts that fit by predicted step time. ``--json`` prints
the same as a document with stable field names (``mtnlg.plan.report``). Exit code 0, 1 when
nothing fits, 2 when the layout is refused (the message names the rule).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from mtnlg.config import ConfigError, load_config, to_dict
from mtnlg.model.config import ModelConfig
from mtnlg.plan.estimate import RECOMPUTE, SCHEDULES
from mtnlg.plan.hardware import GPUS, STACKS
from mtnlg.plan.report import describe_memory, describe_time  # describe_memory: also mtnlg train --check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="model preset (mtnlg.model.presets), e.g. mtnlg-530b")
    hw = parser.add_argument_group("hardware")
    hw.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU kind (default h100)")
    hw.add_argument("--stack", default="torch", choices=STACKS,
                    help="software stack whose fitted matmul efficiency applies (default torch: mtnlg's trainer)")
    hw.add_argument("--gpus", type=int, default=None, help="number of GPUs (or --nodes)")
    hw.add_argument("--nodes", type=int, default=None, help="number of nodes (GPUs = nodes x GPUs per node)")
    hw.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs per node (default: the GPU kind's node, 8); NVLink spans a node")
    parser.add_argument("--global-batch", type=int, default=512, help="sequences per optimizer step (default 512)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    lay = parser.add_argument_group("layout (each one left out is walked)")
    lay.add_argument("--tp", type=int, default=None, help="tensor-parallel degree")
    lay.add_argument("--pp", type=int, default=None, help="pipeline-parallel degree")
    lay.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: what the GPUs leave)")
    lay.add_argument("--cp", type=int, default=None, help="context-parallel degree (ring attention)")
    lay.add_argument("--pp-virtual", "--vpp", type=int, default=None,
                     help="model chunks per pipeline rank (> 1: interleaved)")
    lay.add_argument("--pp-schedule", "--schedule", default=None, choices=SCHEDULES,
                     help="pipeline schedule: 1f1b (interleaved with --pp-virtual > 1), gpipe, interleaved-zb "
                          "(zero bubble over virtual stages), zbv (zero bubble in a V: --pp-virtual 2), "
                          "dualpipev (DeepSeek's DualPipeV: --pp-virtual 2)")
    lay.add_argument("--micro-batch-size", "--micro-batch", type=int, default=None, help="sequences per micro-batch")
    lay.add_argument("--activation-checkpoint", "--recompute", default=None, choices=RECOMPUTE,
                     help="activation recomputation")
    lay.add_argument("--flash-attention", action=argparse.BooleanOptionalAction, default=None,
                     help="a fused attention kernel (--no-flash-attention: the s x s scores are kept)")
    lay.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                     help="FSDP (--no-fsdp: DDP)")
    lay.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                     help="shard norms and dropout over the tensor-parallel ranks (default: when tp > 1)")
    lay.add_argument("--fsdp-grad-sync", default="micro_batch", choices=("micro_batch", "step"),
                     help="FSDP without pipelining: reduce gradients each micro-batch (default) or once a step")
    parser.add_argument("--explore", action="store_true",
                        help="also walk what mtnlg train does not run (cp, zero-bubble schedules, no flash)")
    parser.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    parser.add_argument("--json", action="store_true", help="print a JSON document (fields: docs/plan.md)")
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


def _hardware(args):
    from mtnlg.plan.hardware import get_gpu

    gpu = get_gpu(args.gpu, args.stack)
    if args.gpus_per_node is not None:
        if args.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
        gpu = replace(gpu, gpus_per_node=args.gpus_per_node)
    if args.nodes is not None:
        if args.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
        n = args.nodes * gpu.gpus_per_node
        if args.gpus is not None and args.gpus != n:
            raise ConfigError(f"--gpus {args.gpus} disagrees with --nodes {args.nodes} x {gpu.gpus_per_node} "
                              f"GPUs per node = {n}")
        return gpu, n
    if args.gpus is None:
        raise ConfigError("give the GPUs: --gpus N or --nodes N")
    if args.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    return gpu, args.gpus


def _one_layout(choices, n_gpus: int, fsdp_grad_sync: str):
    from mtnlg.plan.estimate import Layout

    c = choices
    split = c.tp * c.cp * c.pp
    if n_gpus % split:
        raise ConfigError(f"{n_gpus} GPUs are not divisible by tp x cp x pp = {c.tp} x {c.cp} x {c.pp} = {split}")
    dp = n_gpus // split
    if c.dp is not None and c.dp != dp:
        raise ConfigError(f"--dp {c.dp} x tp {c.tp} x cp {c.cp} x pp {c.pp} = {c.dp * split}, but there are "
                          f"{n_gpus} GPUs")
    return Layout(tp=c.tp, pp=c.pp, dp=dp, cp=c.cp, pp_virtual=c.pp_virtual, micro_batch_size=c.micro_batch_size,
                  activation_checkpoint=c.activation_checkpoint, flash_attention=c.flash_attention, fsdp=c.fsdp,
                  fsdp_grad_sync=fsdp_grad_sync, sequence_parallel=c.tp > 1 and c.sequence_parallel is not False,
                  pp_schedule=c.pp_schedule)


def main(args: argparse.Namespace) -> int:
    from mtnlg.model.flops import count_parameters
    from mtnlg.plan.estimate import Workload, estimate
    from mtnlg.plan.report import SCHEMA, estimate_json, format_table, table_row
    from mtnlg.plan.search import Choices, layout_problem, plan, trainer_gap

    model = model_from_args(args.preset, list(args.overrides), args.seq)
    model.validate()
    gpu, n_gpus = _hardware(args)
    if args.global_batch < 1:
        raise ConfigError(f"--global-batch must be >= 1, got {args.global_batch}")
    choices = Choices(tp=args.tp, pp=args.pp, dp=args.dp, cp=args.cp, pp_virtual=args.pp_virtual,
                      pp_schedule=args.pp_schedule, micro_batch_size=args.micro_batch_size,
                      activation_checkpoint=args.activation_checkpoint, flash_attention=args.flash_attention,
                      fsdp=args.fsdp, sequence_parallel=args.sequence_parallel)
    workload = Workload(args.global_batch, model.seq_length)
    n_params = count_parameters(model)
    nodes = n_gpus // gpu.gpus_per_node if n_gpus % gpu.gpus_per_node == 0 else n_gpus / gpu.gpus_per_node
    doc = {"schema": SCHEMA, "mode": None, "gpu": gpu.name, "gpus": n_gpus, "nodes": nodes,
           "gpus_per_node": gpu.gpus_per_node, "parameters": n_params, "seq_length": model.seq_length,
           "global_batch": args.global_batch, "estimate": None, "problem": None, "fitting": [], "too_big": 0,
           "invalid": {}}
    head = (f"{n_params / 1e9:.2f}B parameters, seq {model.seq_length}, global batch {args.global_batch}, "
            f"{n_gpus} x {gpu.name} ({gpu.peak_tflops:.0f} TFLOP/s bf16 at {gpu.gemm_efficiency:.1%}, "
            f"{gpu.memory_gb:.0f} GB, {gpu.gpus_per_node} per node)")

    if choices.complete():
        lay = _one_layout(choices, n_gpus, args.fsdp_grad_sync)
        problem = layout_problem(model, lay, args.global_batch)
        e = estimate(model, lay, workload, gpu)
        gap = trainer_gap(lay)
        doc.update(mode="evaluate", problem=problem, estimate=estimate_json(e, gap),
                   fitting=[estimate_json(e, gap)] if e.fits and not problem else [],
                   too_big=int(e.fits is False and not problem), invalid={problem: 1} if problem else {})
        if args.json:
            print(json.dumps(doc, indent=1))
        else:
            print(head)
            print(f"{lay.describe()}, {lay.schedule_name} schedule, recompute {lay.activation_checkpoint}, "
                  f"{'flash' if lay.flash_attention else 'unfused'} attention, {_dp_mode_name(lay)}")
            if gap:
                print(f"what-if: mtnlg train does not run {gap}")
            print(f"memory per GPU: {describe_memory(e)} ({'fits in' if e.fits else 'over'} "
                  f"{gpu.memory_gb:.0f} GB)")
            print(f"{describe_time(e)}; bubble {100 * e.time.bubble_fraction:.1f}%")
            print(f"{e.tokens_per_second:,.0f} tokens/s ({e.tokens_per_second_per_gpu:,.0f} per GPU), "
                  f"{e.model_tflops_per_gpu:.0f} model / {e.hardware_tflops_per_gpu:.0f} hardware TFLOP/s per GPU, "
                  f"MFU {100 * e.mfu:.1f}%")
        if problem:
            raise ConfigError(problem)
        return 0 if e.fits else 1

    result = plan(model, n_gpus, gpu, workload, choices, explore=args.explore)
    doc.update(mode="rank", fitting=[estimate_json(e, trainer_gap(e.layout)) for e in result.fitting],
               too_big=len(result.too_big), invalid=dict(result.invalid))
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0 if result.fitting else 1
    print(head)
    print(f"{len(result.fitting)} layouts fit, {len(result.too_big)} valid but over {gpu.memory_gb:.0f} GB, "
          f"{sum(result.invalid.values())} refused by the layout rules")
    if not result.fitting:
        if result.too_big:
            e = result.too_big[0]
            print(f"smallest: {e.layout.describe()} {e.layout.activation_checkpoint} "
                  f"{_dp_mode_name(e.layout)}: {describe_memory(e)}")
        for reason, count in result.invalid.most_common(3):
            print(f"  {count} x {reason}")
        return 1
    shown = result.fitting[:args.top]
    print(format_table([table_row(i + 1, e, trainer_gap(e.layout)) for i, e in enumerate(shown)]))
    if any(trainer_gap(e.layout) for e in shown):
        print("* a what-if: mtnlg train does not run it (context parallelism with a pipeline, a zero-bubble "
              "schedule with FSDP, or unfused attention); nf = no flash attention")
    best = result.best
    print(f"best: {best.layout.describe()}: {describe_memory(best)}; {describe_time(best)}")
    return 0


def _dp_mode_name(lay) -> str:
    from mtnlg.plan.report import dp_mode

    return dp_mode(lay)
