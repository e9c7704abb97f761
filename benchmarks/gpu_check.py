"""One prepared check of the GPU path, printing a JSON summary (``benchmarks/gpu_check.sh``).

On a GPU (default) it measures and checks, each section on its own so that one failure
does not hide the others:

* ``gemm``: the machine's bf16 8192 x 8192 matmul rate (TFLOP/s);
* ``sdpa``: whether the flash kernel of ``scaled_dot_product_attention`` runs our
  attention's call (bf16, causal, dropout) when it is the only kernel allowed;
* ``train_eager`` / ``train_compiled``: ``mtnlg-1.3b`` at sequence 2048 in bf16 on one GPU,
  trained by the real ``Trainer.optimizer_step`` (meta-device init, fused AdamW, clipping):
  tokens/s, MFU against the dense bf16 peak (989 TFLOP/s for H100/H200), peak memory; the
  compiled run also reports Dynamo's graph breaks and how many graphs it compiled;
* ``syncs_per_step``: host reads per non-logging step (``mtnlg.dist.SyncCounter``) and,
  on CUDA, the synchronisations ``torch.cuda.set_sync_debug_mode`` reports;
* ``wrappers``: tensor parallel and FSDP2 applied on one-rank meshes give the plain
  model's loss;
* ``resume``: 4 steps straight against 2 steps, a checkpoint, and 2 resumed steps (dropout
  on): the losses must be bitwise equal;
* ``fp16``: loss scaling (``train.dtype=fp16``): finite losses and the scale;
* ``fp8``: ``train.dtype=fp8`` (torchao float8 training of the blocks' linear layers)
  against bf16, both compiled, from the same seed and data, 50 steps each of
  ``mtnlg-1.3b`` cut to 8 layers: tokens/s of each and their ratio, the final losses and
  the largest loss difference over the 50 steps, peak memory. Skipped, saying why, on a
  GPU below compute capability 8.9 or without torchao.

``--cpu`` runs every section on the CPU with the small debug model (what the tests run, so
the script keeps working without a GPU); the MFU is then against the measured fp32 matmul,
and ``fp8`` runs eager through the CPU's float8 matmul (its timing says nothing of a GPU's).

    python benchmarks/gpu_check.py            # one GPU
    python benchmarks/gpu_check.py --cpu      # the same checks, small, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import _token_dir, _trainer  # noqa: E402  (the training benchmark's helpers)

H100_PEAK = 989.0


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm(device: str) -> dict:
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device == "cuda" else 4
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    dt = time.perf_counter() - t
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": reps * 2 * n ** 3 / dt / 1e12}


def sdpa(device: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mtnlg.model.gpt import CoreAttention

    if device != "cuda":
        return {"flash": False, "note": "the flash kernel is CUDA-only"}
    core = CoreAttention(dropout=0.1).train()
    q, k, v = (torch.randn(2, 2048, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            core(q, k, v)
        return {"flash": True}
    except RuntimeError as e:
        return {"flash": False, "error": str(e)[:300]}


def _model_overrides(device: str, tmp: str, data: str, compile_: bool, extra: list[str]) -> tuple[str, list[str]]:
    if device == "cuda":
        return "mtnlg-1.3b", [f"data.path={data}", f"output={tmp}/run", "parallel.tp=1",
                              f"parallel.compile={compile_}", "parallel.activation_checkpoint=none",
                              "train.global_batch_size=8", "train.micro_batch_size=4", "train.dtype=bf16",
                              "train.device=cuda", "train.eval_iters=0", "train.steps=100000",
                              "model.dropout=0", "model.attention_dropout=0", *extra]
    return "debug", [f"data.path={data}", f"output={tmp}/run", "parallel.tp=1", f"parallel.compile={compile_}",
                     "train.global_batch_size=8", "train.micro_batch_size=4", "train.dtype=fp32",
                     "train.device=cpu", "train.eval_iters=0", "train.steps=100000", "model.dropout=0",
                     "model.attention_dropout=0", *extra]


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def train_throughput(device: str, data: str, steps: int, compile_: bool, peak: float) -> dict:
    from mtnlg.dist import SyncCounter
    from mtnlg.model.flops import flops_per_token

    if compile_:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    with tempfile.TemporaryDirectory(prefix="mtnlg-gpucheck-") as tmp:
        name, overrides = _model_overrides(device, tmp, data, compile_, [])
        trainer = _trainer(name, overrides, device)
        try:
            cfg = trainer.cfg
            for _ in range(2):  # warm-up: allocator, kernels, compilation
                trainer.optimizer_step(False)
            _sync(device)
            counter = SyncCounter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    with counter:
                        trainer.optimizer_step(False)
                finally:
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                trainer.optimizer_step(False)
            _sync(device)
            dt = (time.perf_counter() - t) / steps
            tokens = cfg.train.global_batch_size * cfg.model.seq_length
            tflops = tokens / dt * flops_per_token(cfg.model, 1) / 1e12
            out = {"model": name, "parameters": trainer.n_params, "seq": cfg.model.seq_length,
                   "step_s": dt, "tokens_per_s": tokens / dt, "tflops": tflops, "mfu": tflops / peak,
                   "mfu_against_tflops": peak, "host_reads_per_step": counter.count,
                   "host_reads": counter.calls[:10], "cuda_syncs_per_step": cuda_syncs if device == "cuda" else None}
            if device == "cuda":
                out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            if compile_:
                c = torch._dynamo.utils.counters
                out["graph_breaks"] = sum(c["graph_break"].values())
                out["graph_break_reasons"] = list(c["graph_break"])[:5]
                out["graphs"] = c["stats"].get("unique_graphs", 0)  # compiled graphs (one per block shape)
            return out
        finally:
            _close()


def wrappers(device: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mtnlg.dist import init_process_group
    from mtnlg.model.gpt import GPT
    from mtnlg.model.presets import get_preset
    from mtnlg.parallel.loss import cross_entropy, loss_parallel_context
    from mtnlg.parallel.tensor_parallel import apply_tensor_parallel

    init_process_group(device)
    try:
        cfg = get_preset("debug")
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), device=device)
        losses = {}
        for kind in ("plain", "tp", "fsdp"):
            with torch.device(device):
                model = GPT(cfg)
            model.init_weights(seed=1)
            mesh = init_device_mesh(device, (1,))
            if kind == "tp":
                apply_tensor_parallel(model, mesh, sequence_parallel=False)
            elif kind == "fsdp":
                for block in model.layers:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            with loss_parallel_context(kind == "tp"):
                loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
                loss.backward()
            losses[kind] = float(loss)
        ok = all(abs(v - losses["plain"]) <= 1e-5 * abs(losses["plain"]) for v in losses.values())
        return {"losses": losses, "ok": ok}
    finally:
        _close()


def resume(device: str, data: str) -> dict:
    def run(tmp: str, steps: int, load: str) -> list[float]:
        name, overrides = _model_overrides(device, tmp, data, False,
                                           ["model.dropout=0.1", "model.attention_dropout=0.1", "train.steps=4",
                                            f"checkpoint.load={load}"])
        trainer = _trainer(name, overrides, device)
        try:
            trainer.checkpointer.maybe_resume()
            losses = [float(trainer.optimizer_step(False).loss) for _ in range(steps)]
            trainer.checkpointer.save()
            return losses
        finally:
            _close()

    with tempfile.TemporaryDirectory(prefix="mtnlg-gpucheck-") as a, \
            tempfile.TemporaryDirectory(prefix="mtnlg-gpucheck-") as b:
        straight = run(a, 4, "none")
        first = run(b, 2, "none")
        second = run(b, 2, "auto")
    return {"straight": straight, "resumed": first + second, "bitwise": straight == first + second}


def fp16(device: str, data: str) -> dict:
    if device != "cuda":
        return {"skipped": "fp16 loss scaling is checked on CUDA"}
    with tempfile.TemporaryDirectory(prefix="mtnlg-gpucheck-") as tmp:
        _, overrides = _model_overrides("cpu", tmp, data, False, [])
        overrides = [o for o in overrides if not o.startswith(("train.dtype", "train.device"))]
        trainer = _trainer("debug", overrides + ["train.dtype=fp16", "train.device=cuda"], "cuda")
        try:
            losses = [float(trainer.optimizer_step(False).loss) for _ in range(4)]
            return {"losses": losses, "finite": all(x == x and abs(x) != float("inf") for x in losses),
                    "scale": float(trainer.scaler.get_scale())}
        finally:
            _close()


FP8_STEPS = 50
FP8_MIN_CAPABILITY = (8, 9)


def _learnable_token_dir(root: str, vocab: int, n_tokens: int) -> str:
    """Tokens a model learns within tens of steps (each the previous plus 1 or 2, mod the
    vocabulary), so that the bf16 and fp8 loss curves fall and can be compared."""
    import numpy as np

    from mtnlg.formats.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    n_tokens -= n_tokens % 1000  # whole documents of 1000
    tokens = np.cumsum(rng.integers(1, 3, n_tokens)) % vocab
    for split in ("train", "validation"):
        with IndexedDatasetBuilder(os.path.join(root, split), np.uint16 if vocab <= 1 << 16 else np.int32) as b:
            b.add_documents(tokens, np.full(n_tokens // 1000, 1000, dtype=np.int64))
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        json.dump({"vocab_size": vocab, "eod_id": 2}, f)
    return root


def _fp8_unavailable() -> str | None:
    """Why this GPU cannot train in fp8, or None."""
    cap = torch.cuda.get_device_capability()
    if tuple(cap) < FP8_MIN_CAPABILITY:
        return (f"train.dtype=fp8 needs compute capability 8.9+ (Ada, Hopper); {torch.cuda.get_device_name()} "
                f"is {cap[0]}.{cap[1]}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return f"torchao is not installed ({e}); pip install 'mtnlg[fp8]'"
    return None


def _precision_run(device: str, data: str, dtype: str, steps: int, warmup: int) -> dict:
    """``steps`` optimizer steps in ``dtype`` (the first ``warmup`` untimed): tokens/s over
    the rest, every step's loss (read after the timing, so no step waits for the device)."""
    import gc

    from mtnlg.parallel.float8 import float8_layers

    cuda = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="mtnlg-gpucheck-") as tmp:
        name, overrides = _model_overrides(device, tmp, data, cuda, [])
        overrides = [o for o in overrides if not o.startswith(("train.dtype", "train.device"))]
        overrides += [f"train.dtype={dtype}", "schedule.decay=constant", "schedule.warmup_steps=5",
                      "optim.lr=3e-4" if cuda else "optim.lr=3e-3"]
        if cuda:
            overrides += ["model.num_layers=8"]
            torch._dynamo.reset()
            torch.cuda.reset_peak_memory_stats()
        else:  # bf16 matmuls are slow on CPUs: a smaller batch keeps the test's run short
            overrides += ["train.global_batch_size=4", "train.micro_batch_size=4"]
        trainer = _trainer(name, overrides, device)
        try:
            cfg = trainer.cfg
            losses = [trainer.optimizer_step(False).loss for _ in range(warmup)]
            _sync(device)
            t = time.perf_counter()
            losses += [trainer.optimizer_step(False).loss for _ in range(steps - warmup)]
            _sync(device)
            dt = time.perf_counter() - t
            out = {"float8_layers": len(float8_layers(trainer.engine.model)),
                   "tokens_per_s": (steps - warmup) * cfg.train.global_batch_size * cfg.model.seq_length / dt,
                   "losses": [float(x) for x in losses]}
            if cuda:
                out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            return out
        finally:
            del trainer
            _close()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def fp8(device: str, data_root: str, steps: int) -> dict:
    """bf16 against fp8 (``train.dtype=fp8``) from the same seed and data; compiled on a GPU
    (where float8 pays off), eager on the CPU. The ``Trainer`` is built directly, as in the
    other sections: ``train()`` itself refuses fp8 on the CPU."""
    cuda = device == "cuda"
    if cuda and (why := _fp8_unavailable()):
        return {"skipped": why}
    total, warmup = (FP8_STEPS, 5) if cuda else (steps + 1, 1)
    vocab = 50257 if cuda else 512
    data = _learnable_token_dir(os.path.join(data_root, "learnable"), vocab,
                                (total + 10) * 8 * (2049 if cuda else 65))
    runs = {dtype: _precision_run(device, data, dtype, total, warmup) for dtype in ("bf16", "fp8")}
    bf16, f8 = runs["bf16"]["losses"], runs["fp8"]["losses"]
    out = {"steps": total, "compiled": cuda, **runs,
           "speedup": runs["fp8"]["tokens_per_s"] / runs["bf16"]["tokens_per_s"],
           "final_loss": {"bf16": bf16[-1], "fp8": f8[-1]},
           "max_loss_difference": max(abs(a - b) for a, b in zip(bf16, f8))}
    if not cuda:
        out["note"] = "CPU: float8 matmuls without float8 hardware; the timing says nothing of a GPU's"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the small CPU version of every check")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 10 GPU, 3 CPU)")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out (e.g. train_compiled)")
    args = p.parse_args(argv)
    skip = {x for x in args.skip.split(",") if x}
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; run with --cpu"}))
        return 2
    os.environ.setdefault("MTNLG_LOG_LEVEL", "WARNING")
    steps = args.steps or (10 if device == "cuda" else 3)
    summary: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "torch": torch.__version__}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtnlg-gpucheck-data-") as d:
        vocab = 50257 if device == "cuda" else 512
        data = _token_dir(os.path.join(d, "tok"), vocab, 2_000_000 if device == "cuda" else 200_000)
        summary["gemm"] = _section(lambda: gemm(device))
        peak = H100_PEAK if device == "cuda" else summary["gemm"].get("tflops", 1.0)
        sections = {
            "sdpa": lambda: sdpa(device),
            "train_eager": lambda: train_throughput(device, data, steps, False, peak),
            "train_compiled": lambda: train_throughput(device, data, steps, True, peak),
            "wrappers": lambda: wrappers(device),
            "resume": lambda: resume(device, data),
            "fp16": lambda: fp16(device, data),
            "fp8": lambda: fp8(device, d, steps),
        }
        for name, fn in sections.items():
            if name not in skip:
                summary[name] = _section(fn)
        summary["syncs_per_step"] = {k: summary[k].get("host_reads_per_step")
                                     for k in ("train_eager", "train_compiled") if k in summary}
    summary["seconds"] = time.perf_counter() - t0
    summary["ok"] = all("error" not in v for v in summary.values() if isinstance(v, dict))
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if summary["ok"] else 1


def _section(fn) -> dict:
    t = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
    out["seconds"] = time.perf_counter() - t
    return out


if __name__ == "__main__":
    sys.exit(main())
