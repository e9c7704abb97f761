"""Serving throughput: ``mtnlg serve`` under N concurrent OpenAI clients, next to sequential
generation (what ``mtnlg generate`` does, one request after another) in the same run.

    .venv/bin/python benchmarks/serve.py                          # small-20m, random weights, CPU
    .venv/bin/python benchmarks/serve.py --model runs/local/model --clients 8 --requests 64

1. The model: ``--model DIR`` (a fused model, e.g. what ``make run`` trained), or a model of
   ``--preset`` size with random weights (speed does not depend on them) and a throwaway
   tokenizer, saved as a fused model directory.
2. Sequential baseline: ``mtnlg.model.decode.generate`` on each request's prompt in turn,
   greedy, exactly ``--max-tokens`` new tokens (no early stop), in this process; the faster
   of two passes.
3. Served: ``mtnlg serve`` in a subprocess on 127.0.0.1; ``--clients`` threads, each with
   the official ``openai`` client, send ``--requests`` requests in all (the same prompts,
   ``max_tokens`` = ``min_tokens`` = ``--max-tokens``, temperature 0), each thread waiting for
   its answer before sending the next. Latency is per request (send to last byte).

Prints tokens/s of both, the ratio served / sequential (aim: >= 2 with 8 clients), p50/p99
latency, the server's mean batch size and the error count (must be 0; the script fails
otherwise), with the load average. The request loop is bounded (``--requests``) and only
talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch

WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps near the warm fire".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_model(preset: str, tmp: str) -> str:
    import sentencepiece as spm

    from mtnlg.formats.fused import save_fused
    from mtnlg.formats.tokenizer import Tokenizer
    from mtnlg.model.gpt import GPT
    from mtnlg.model.presets import get_preset

    text = " ".join(WORDS) + " "
    spm.SentencePieceTrainer.train(sentence_iterator=iter([text * 20] * 50), model_prefix=f"{tmp}/sp",
                                   vocab_size=64, model_type="bpe", eos_id=1, bos_id=-1, pad_id=-1, unk_id=0,
                                   minloglevel=2)
    tok = Tokenizer(f"{tmp}/sp.model")
    torch.manual_seed(0)
    cfg = get_preset(preset)
    import dataclasses

    model = GPT(dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, tok.vocab_size))).eval()
    out = f"{tmp}/model"
    save_fused(model, out, tok)
    return out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="fused model directory (default: random weights of --preset)")
    p.add_argument("--preset", default="small-20m")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="requests in all (bounded load)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=None, help="the server's --batch-wait-ms (default its own)")
    args = p.parse_args(argv)
    import openai

    from mtnlg.formats.fused import load_fused
    from mtnlg.model.decode import generate

    prompts = [" ".join(WORDS[i % len(WORDS): i % len(WORDS) + 4]) or "the fox" for i in range(args.requests)]
    with tempfile.TemporaryDirectory(prefix="mtnlg-bench-serve-") as tmp:
        model_dir = args.model or _random_model(args.preset, tmp)
        model, cfg, tok = load_fused(model_dir)
        n_params = sum(p.numel() for p in model.parameters())

        # sequential baseline (one warm-up first); the faster of two passes, so that noise
        # on a shared machine can only lower the ratio
        generate(model, tok, prompts[0], max_new_tokens=4, stop_at_eod=False)
        seq_tokens, seq_s = len(prompts) * args.max_tokens, float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            for pr in prompts:
                generate(model, tok, pr, max_new_tokens=args.max_tokens, stop_at_eod=False)
            seq_s = min(seq_s, time.perf_counter() - t0)
        del model

        port = _free_port()
        name = "bench"
        proc = subprocess.Popen([sys.executable, "-m", "mtnlg.cli", "serve", model_dir, "--port", str(port),
                                 "--served-model-name", name, "--max-batch-size", str(args.max_batch_size),
                                 *(["--batch-wait-ms", str(args.batch_wait_ms)] if args.batch_wait_ms is not None else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                env={k: v for k, v in os.environ.items() if k != "MTNLG_API_KEY"})  # no key here
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("mtnlg serve did not start")
                time.sleep(0.2)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
            client.completions.create(model=name, prompt=prompts[0], max_tokens=4, temperature=0)  # warm-up

            latencies: list[float] = []
            errors: list[str] = []
            served_tokens = 0
            lock = threading.Lock()
            next_i = iter(range(args.requests))

            def worker():
                nonlocal served_tokens
                while True:
                    with lock:
                        i = next(next_i, None)
                    if i is None:
                        return
                    t = time.perf_counter()
                    try:
                        r = client.completions.create(model=name, prompt=prompts[i], max_tokens=args.max_tokens,
                                                      temperature=0, extra_body={"min_tokens": args.max_tokens})
                        with lock:
                            served_tokens += r.usage.completion_tokens
                            latencies.append(time.perf_counter() - t)
                    except Exception as e:  # counted, and the script fails below
                        with lock:
                            errors.append(f"{type(e).__name__}: {e}")

            before = httpx.get(url + "/health").json()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(args.clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            served_s = time.perf_counter() - t0
            after = httpx.get(url + "/health").json()
        finally:
            proc.terminate()
            proc.wait(60)

    batches = after["batches"] - before["batches"]
    res = {
        "model": args.model or f"{args.preset} (random weights)", "parameters": n_params,
        "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "sequential_tokens_per_s": seq_tokens / seq_s,
        "served_tokens_per_s": served_tokens / served_s,
        "ratio": (served_tokens / served_s) / (seq_tokens / seq_s),
        "latency_p50_s": _percentile(latencies, 50) if latencies else None,
        "latency_p99_s": _percentile(latencies, 99) if latencies else None,
        "mean_batch_size": (after["batched_requests"] - before["batched_requests"]) / batches if batches else 0,
        "errors": len(errors), "loadavg": os.getloadavg()[0],
    }
    print(json.dumps(res, indent=2))
    print(f"served {res['served_tokens_per_s']:.0f} tok/s with {args.clients} clients vs sequential "
          f"{res['sequential_tokens_per_s']:.0f} tok/s: {res['ratio']:.2f}x (p50 {res['latency_p50_s']:.2f} s, "
          f"p99 {res['latency_p99_s']:.2f} s, mean batch {res['mean_batch_size']:.1f}, errors {len(errors)}, "
          f"load {res['loadavg']:.2f})")
    if errors:
        print("errors:", *errors[:5], sep="\n  ", file=sys.stderr)
        raise SystemExit(1)
    return res


if __name__ == "__main__":
    main()
