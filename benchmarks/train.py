"""Training throughput of the mtnlg trainer: tokens/s, achieved FLOP/s and MFU.

CPU (default): the ``small-20m`` GPT (5 layers, hidden 512, 8 heads, vocab 8192, ~20M
parameters), sequence 256, batch 8, AdamW, fp32, 2 threads, trained by the real
``Trainer.optimizer_step`` (data read from a token file, loss, clipping, scheduled AdamW) next
to, in the same process and interleaved step by step (so that load from other processes
hits all three alike):

* a 2048 x 2048 fp32 matmul, the practical FLOP/s limit of the machine: the trainer's
  achieved FLOP/s over it is reported as CPU MFU;
* Hugging Face ``transformers`` ``GPT2LMHeadModel`` of the same shape, batch, optimizer and
  clipping (dropout 0 in both, SDPA attention in both).

FLOPs per token are ``6 N + 12 L H T`` (``mtnlg.model.flops``) for both models.

    python benchmarks/train.py                  # CPU, prints the table and the ratios
    python benchmarks/train.py --device cuda    # one GPU: bf16 ~1.3B model, seq 2048, MFU vs peak
    python benchmarks/train.py --sweep          # CPU layout sweep: tp, pp, dp over 1, 2, 4 processes

``--sweep`` trains the ``small-20m`` model with ``mtnlg train --nproc N`` in each layout
(the real launcher, gloo) and prints tokens/s next to the single process's, then measures
the pipeline bubble of every schedule (``--bubble``: only that): 2 ranks, m micro-batches,
each rank's busy time (its forward, backward, input- and weight-gradient chunks, timed
inside ``torch.distributed.pipelining``) against the step's, next to the schedule's
formula (``BUBBLE_FORMULAS``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

AIM_HF_RATIO = 1.15
AIM_CPU_MFU = 0.80
AIM_GPU_MFU = 0.50


def _token_dir(root: str, vocab: int, n_tokens: int) -> str:
    """A tokenized directory of uniformly random tokens (throughput does not depend on them)."""
    from mtnlg.formats.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    for split, n in (("train", n_tokens), ("validation", n_tokens // 10)):
        with IndexedDatasetBuilder(os.path.join(root, split), dtype) as b:
            tokens = rng.integers(0, vocab, n, dtype=np.int64)
            lengths = np.full(n // 1000, 1000, dtype=np.int64)
            b.add_documents(tokens[: lengths.sum()], lengths)
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        json.dump({"vocab_size": vocab, "eod_id": 2}, f)
    return root


def _trainer(recipe_name: str, overrides: list[str], device: str):
    from mtnlg.config import load_config
    from mtnlg.dist import init_process_group
    from mtnlg.train.config import TrainRunConfig, recipe
    from mtnlg.train.trainer import Trainer

    cfg = load_config(TrainRunConfig, None, overrides, base=recipe(recipe_name))
    env = init_process_group(device)
    return Trainer(cfg, env, device)  # its datasets open as it is built


def _hf_step(cfg, batch: int, lr: float, betas, wd: float, clip: float):
    import logging

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hc = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_length, n_embd=cfg.hidden_size,
                    n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hc)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd, fused=True)
    gen = torch.Generator().manual_seed(0)
    T = cfg.seq_length

    def step() -> float:
        tokens = torch.randint(0, cfg.vocab_size, (batch, T), generator=gen)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, n_params


def _matmul_step(n: int = 2048, reps: int = 8):
    a, b = torch.randn(n, n), torch.randn(n, n)

    def step() -> float:
        for _ in range(reps):
            torch.mm(a, b)
        return 0.0

    return step, reps * 2 * n ** 3


def _time(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_cpu(args) -> dict:
    from mtnlg.model.flops import flops_per_token

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mtnlg-bench-") as d:
        data = _token_dir(os.path.join(d, "tok"), 8192, 400_000)
        trainer = _trainer("small-20m", [
            f"data.path={data}", f"output={d}/run", "parallel.tp=1", f"parallel.compile={args.compile}",
            f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
            "train.dtype=fp32", "train.device=cpu", "train.eval_iters=0", "train.steps=100000",
            "model.dropout=0", "model.attention_dropout=0"], "cpu")
        cfg = trainer.cfg
        o = cfg.optim
        fpt = flops_per_token(cfg.model)
        tokens_per_step = args.batch * cfg.model.seq_length
        ours = lambda: trainer.optimizer_step(False)  # noqa: E731
        steps = {"mtnlg": ours}
        if not args.no_hf:
            hf, hf_params = _hf_step(cfg.model, args.batch, o.lr, tuple(o.betas), o.weight_decay, o.grad_clip)
            steps["hf"] = hf
        mm, mm_flops = _matmul_step()
        steps["matmul"] = mm
        print(f"mtnlg small-20m: {trainer.n_params:,} parameters"
              + (f"; HF GPT2LMHeadModel: {hf_params:,}" if not args.no_hf else "")
              + f"; seq {cfg.model.seq_length}, batch {args.batch}, {args.threads} threads, fp32, AdamW"
              + (", compiled blocks" if args.compile else ""), flush=True)
        for name, fn in steps.items():  # warm-up (allocator, kernels, compilation)
            _time(fn, args.warmup)
        # Interleaved step by step, so that load from other processes hits all three alike.
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(args.rounds):
            for _ in range(args.steps):
                for name, fn in steps.items():
                    times[name] += _time(fn, 1)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {statistics.median(v):.3f}s/step" for k, v in times.items()), flush=True)
        load_after = os.getloadavg()
        import torch.distributed as dist

        dist.destroy_process_group()

    def rate(name: str, stat) -> float:
        return tokens_per_step / stat(times[name])

    out = {"load_avg_before": load_before, "load_avg_after": load_after, "flops_per_token": fpt}
    for label, stat in (("median", statistics.median), ("best", min)):
        mm_rate = mm_flops / stat(times["matmul"])
        row = {"matmul_gflops": mm_rate / 1e9, "mtnlg_tokens_per_s": rate("mtnlg", stat)}
        row["mtnlg_gflops"] = row["mtnlg_tokens_per_s"] * fpt / 1e9
        row["mtnlg_cpu_mfu"] = row["mtnlg_gflops"] * 1e9 / mm_rate
        if "hf" in times:
            row["hf_tokens_per_s"] = rate("hf", stat)
            row["hf_gflops"] = row["hf_tokens_per_s"] * fpt / 1e9
            row["hf_cpu_mfu"] = row["hf_gflops"] * 1e9 / mm_rate
            row["mtnlg_over_hf"] = row["mtnlg_tokens_per_s"] / row["hf_tokens_per_s"]
        out[label] = row
    print()
    print(f"{'':24s} {'median step':>14s} {'fastest step':>14s}")
    for k in ("matmul_gflops", "mtnlg_tokens_per_s", "mtnlg_gflops", "mtnlg_cpu_mfu",
              "hf_tokens_per_s", "hf_gflops", "hf_cpu_mfu", "mtnlg_over_hf"):
        if k in out["median"]:
            fmt = (lambda v: f"{100 * v:13.1f}%") if "mfu" in k else (lambda v: f"{v:14,.2f}")
            print(f"{k:24s} {fmt(out['median'][k])} {fmt(out['best'][k])}")
    b, m = out["best"], out["median"]
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} CPUs). Headline figures use each kind's fastest step (as timeit does):")
    print("the least disturbed by other processes; medians are shown for the record.")
    print(f"CPU MFU: {100 * b['mtnlg_cpu_mfu']:.1f}% (median {100 * m['mtnlg_cpu_mfu']:.1f}%; "
          f"aim >= {100 * AIM_CPU_MFU:.0f}%)")
    if "mtnlg_over_hf" in b:
        print(f"tokens/s vs Hugging Face: {b['mtnlg_over_hf']:.2f}x (median {m['mtnlg_over_hf']:.2f}x; "
              f"aim >= {AIM_HF_RATIO}x)")
    return out


def run_cuda(args) -> dict:
    """bf16 ~1.3B GPT, seq 2048, on one GPU; MFU against the device's dense bf16 peak."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    from mtnlg.model.flops import flops_per_token

    with tempfile.TemporaryDirectory(prefix="mtnlg-bench-") as d:
        data = _token_dir(os.path.join(d, "tok"), 50257, 4_000_000)
        trainer = _trainer("mtnlg-1.3b", [
            f"data.path={data}", f"output={d}/run", "parallel.tp=1", f"parallel.compile={args.compile}",
            "parallel.activation_checkpoint=none",
            f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.micro_batch}",
            "train.dtype=bf16", "train.device=cuda", "train.eval_iters=0", "train.steps=100000",
            "model.dropout=0", "model.attention_dropout=0"], "cuda")
        cfg = trainer.cfg
        fpt = flops_per_token(cfg.model)
        tokens_per_step = args.batch * cfg.model.seq_length

        def step():
            trainer.optimizer_step(False)
            torch.cuda.synchronize()

        print(f"mtnlg-1.3b: {trainer.n_params:,} parameters, seq {cfg.model.seq_length}, batch {args.batch} "
              f"(micro {args.micro_batch}), bf16 on {torch.cuda.get_device_name()}"
              + (", compiled blocks" if args.compile else ""), flush=True)
        _time(step, args.warmup)
        times = _time(step, args.steps * args.rounds)
        import torch.distributed as dist

        dist.destroy_process_group()
    tps = tokens_per_step / statistics.median(times)
    tflops = tps * fpt / 1e12
    out = {"tokens_per_s": tps, "tflops": tflops, "peak_tflops": trainer.peak,
           "mfu": tflops / trainer.peak if trainer.peak else None,
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    print(f"{tps:,.0f} tokens/s, {tflops:.1f} TFLOP/s"
          + (f", MFU {100 * out['mfu']:.1f}% of {trainer.peak:.0f} TFLOP/s (aim >= {100 * AIM_GPU_MFU:.0f}%)"
             if out["mfu"] is not None else " (unknown device peak)")
          + f", peak memory {out['max_memory_gib']:.1f} GiB")
    return out


# small-20m with 4 layers (so that 2 stages split it evenly) in every layout
SWEEP = [("single", 1, ["parallel.tp=1"]), ("tp2", 2, ["parallel.tp=2"]), ("pp2", 2, ["parallel.tp=1", "parallel.pp=2"]),
         ("dp2", 2, ["parallel.tp=1"]), ("tp2 x dp2", 4, ["parallel.tp=2"]),
         ("pp2 x tp2", 4, ["parallel.tp=2", "parallel.pp=2"]), ("pp2 x dp2", 4, ["parallel.tp=1", "parallel.pp=2"]),
         ("dp4", 4, ["parallel.tp=1"]), ("pp2x2 interleaved x dp2", 4, ["parallel.tp=1", "parallel.pp=2",
                                                                    "parallel.pp_virtual=2"])]


def _sweep_layout(data: str, root: str, name: str, nproc: int, extra: list[str], steps: int, batch: int) -> dict:
    import subprocess

    out = os.path.join(root, name.replace(" ", "_"))
    cmd = [sys.executable, "-m", "mtnlg.cli", "train", "--nproc", str(nproc), "--recipe", "small-20m",
           f"data.path={data}", f"output={out}", f"train.steps={steps}", "train.log_every=2", "train.eval_iters=0",
           f"train.global_batch_size={batch}", "train.micro_batch_size=2", "train.dtype=fp32", "train.device=cpu",
           "checkpoint.every=0", "model.dropout=0", "model.attention_dropout=0", "model.num_layers=4", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        return {"error": proc.stderr[-800:]}
    rows = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")) if x.strip()]
    rates = [r["tokens_per_s"] for r in rows[1:]]  # the first interval holds the warm-up
    return {"tokens_per_s": statistics.median(rates), "intervals": len(rates)}


# the schedules of parallel.pp_schedule as (pp_schedule, pp_virtual); their bubble at equal
# forward, input- and weight-gradient times is benchmarks/pipeline_bubble.py's formula
BUBBLE_SCHEDULES = {"1f1b": ("1f1b", 1), "interleaved-1f1b": ("1f1b", 2), "interleaved-zb": ("interleaved-zb", 2),
                    "zbv": ("zbv", 2), "dualpipev": ("dualpipev", 2)}


def bubble_formula(schedule: str, p: int, m: int) -> float:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pipeline_bubble import formula

    if schedule == "dualpipev" and m < 2 * p:  # such a step runs zbv (PipelineParallel)
        schedule = "zbv"
    return formula(schedule, p, m)


def _bubble_worker(rank: int, world: int, port: int, n_micro: int, reps: int, schedule: str, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import stage as stage_mod

    from mtnlg.model.gpt import GPT
    from mtnlg.model.presets import get_preset
    from mtnlg.parallel.config import ParallelConfig
    from mtnlg.parallel.dims import ParallelDims
    from mtnlg.parallel.pipeline_parallel import PipelineParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    busy = {"t": 0.0}
    kinds: dict[str, float] = {}  # seconds in F, B (whole backward), I (input gradient), W (weight gradient)

    def timed(fn, kind):
        def wrapper(self, *a, **kw):
            t = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                spent = time.perf_counter() - t
                busy["t"] += spent
                k = kind if kind != "B" or kw.get("full_backward", True) else "I"
                kinds[k] = kinds.get(k, 0.0) + spent
        return wrapper

    base = stage_mod._PipelineStageBase
    base.forward_one_chunk = timed(base.forward_one_chunk, "F")
    base.backward_one_chunk = timed(base.backward_one_chunk, "B")
    # the weight-gradient half of a split backward (zero-bubble schedules)
    base.backward_weight_one_chunk = timed(base.backward_weight_one_chunk, "W")
    import dataclasses

    # balanced stages: 8 blocks, a small vocabulary so that the head adds little to the last
    cfg = dataclasses.replace(get_preset("small-20m"), num_layers=8, vocab_size=512, tie_embeddings=False,
                              dropout=0.0, attention_dropout=0.0)
    name, virtual = BUBBLE_SCHEDULES[schedule]
    pc = ParallelConfig(pp=world, pp_schedule=name, pp_virtual=virtual)
    dims = ParallelDims.build(pc, world, cfg)
    mesh = dims.build_mesh("cpu")
    model = GPT(cfg)
    pipe = PipelineParallel(model, mesh, dims, pc, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2 * n_micro, cfg.seq_length + 1), generator=g)
    pipe.forward_backward(tokens[:, :-1], tokens[:, 1:], n_micro)  # warm-up
    busy["t"] = 0.0
    kinds.clear()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(reps):
        pipe.forward_backward(tokens[:, :-1], tokens[:, 1:], n_micro)
    total = time.perf_counter() - t
    queue.put((rank, busy["t"], total, kinds))
    dist.destroy_process_group()


def measure_bubble(n_micro: int, reps: int = 3, stages: int = 2, schedule: str = "1f1b") -> dict:
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_bubble_worker, args=(r, stages, port, n_micro, reps, schedule, queue))
             for r in range(stages)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    results.sort(key=lambda r: r[0])
    idle = [1 - busy / total for _, busy, total, _ in results]
    seconds = {k: sum(r[3].get(k, 0.0) for r in results) / reps for k in "FBIW"}
    return {"schedule": schedule, "micro_batches": n_micro, "measured_idle_per_stage": idle,
            "measured": sum(idle) / len(idle), "formula": bubble_formula(schedule, stages, n_micro),
            "step_s": sum(total for _, _, total, _ in results) / len(results) / reps,
            "seconds_per_step_by_kind": {k: round(v, 4) for k, v in seconds.items() if v}}


def run_bubble(schedules=tuple(BUBBLE_SCHEDULES), micro_batches=(2, 4, 8)) -> list[dict]:
    """The bubble of each schedule at each micro-batch count, printed as measured."""
    load_before = os.getloadavg()
    print(f"pipeline bubble, 2 ranks ({os.cpu_count()} CPUs, one thread per rank):", flush=True)
    rows = []
    for schedule in schedules:
        for m in micro_batches:
            b = measure_bubble(m, schedule=schedule)
            rows.append(b)
            print(f"  {schedule:17s} m={m}: measured idle {100 * b['measured']:.1f}% (ranks "
                  f"{', '.join(f'{100 * x:.1f}%' for x in b['measured_idle_per_stage'])}), formula "
                  f"{100 * b['formula']:.1f}%; step {b['step_s']:.2f} s, both ranks' s/step in F, B, I, W: "
                  f"{b['seconds_per_step_by_kind']}; "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    return rows


def run_sweep(args) -> dict:
    load_before = os.getloadavg()
    out: dict = {"layouts": {}}
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from corpus_data import tokenized_dir, whatsnew_paragraphs  # a real tokenizer: the launcher checks for one

    with tempfile.TemporaryDirectory(prefix="mtnlg-sweep-") as d:
        docs = whatsnew_paragraphs()
        data = tokenized_dir(__import__("pathlib").Path(d), docs[: len(docs) * 9 // 10], docs[len(docs) * 9 // 10:],
                             vocab_size=2048)
        for name, nproc, extra in SWEEP:
            r = _sweep_layout(data, d, name, nproc, extra, args.sweep_steps, args.batch)
            out["layouts"][name] = dict(r, processes=nproc)
            print(f"{name:26s} {nproc} proc  " + (f"{r['tokens_per_s']:9,.0f} tokens/s" if "error" not in r
                                                   else "failed: " + r["error"][-200:]), flush=True)
    base = out["layouts"]["single"].get("tokens_per_s")
    for r in out["layouts"].values():
        if base and "tokens_per_s" in r:
            r["vs_single"] = r["tokens_per_s"] / base
    out["bubble"] = run_bubble()
    out["load_avg_before"], out["load_avg_after"] = load_before, os.getloadavg()
    print(f"\n{'layout':26s} {'procs':>5s} {'tokens/s':>10s} {'x single':>9s}")
    for name, r in out["layouts"].items():
        if "tokens_per_s" in r:
            print(f"{name:26s} {r['processes']:5d} {r['tokens_per_s']:10,.0f} {r['vs_single']:9.2f}")
    print(f"load average before {load_before[0]:.2f}, after {out['load_avg_after'][0]:.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 8)")
    p.add_argument("--micro-batch", type=int, default=4, help="micro batch (cuda mode)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face comparison")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--sweep", action="store_true", help="CPU layout sweep over 1, 2 and 4 processes")
    p.add_argument("--sweep-steps", type=int, default=12, help="steps per layout in --sweep")
    p.add_argument("--bubble", nargs="*", choices=tuple(BUBBLE_SCHEDULES), default=None,
                   help="only the pipeline bubble of these schedules (all if none named)")
    args = p.parse_args(argv)
    args.batch = args.batch or 8
    os.environ.setdefault("MTNLG_LOG_LEVEL", "WARNING")
    if args.bubble is not None:
        out = {"bubble": run_bubble(tuple(args.bubble) or tuple(BUBBLE_SCHEDULES))}
    elif args.sweep:
        out = run_sweep(args)
    else:
        out = run_cuda(args) if args.device == "cuda" else run_cpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
