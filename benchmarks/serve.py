"""Serving side by side, in one run: ``mtnlg serve`` (continuous batching on our fused
model), ``transformers serve --continuous-batching`` on its Hugging Face export (the same
weights), and sequential generation (``mtnlg generate``'s loop, one request after another),
on one mixed load.

    .venv/bin/python benchmarks/serve.py                          # small-20m, random weights, CPU
    .venv/bin/python benchmarks/serve.py --requests 64 --rate 3 --systems mtnlg,sequential

1. The model: a ``--preset`` model with random weights (speed does not depend on them) and
   a window of ``--seq-length`` positions, with a 1024-piece tokenizer trained here on
   made-up words (exactly convertible, so the export carries ``tokenizer.json``), saved as a
   fused model and exported with ``mtnlg.fuse.hf.export_hf`` (logits checked against ours).
   The export's tokenizer is given our prompt rule (the end-of-document token first), so
   both servers run the same token ids.
2. The load (``--seed``): requests in three classes, short (prompt 8-64 tokens, output
   4-32), medium (64-256, 32-128) and long (256-512, 128-256), half, a third and a sixth
   of them. Greedy, exactly the asked number of tokens (``min_tokens`` on ours, the
   ``generation_config`` field's ``min_new_tokens`` on transformers'), streamed, so time to
   first token is the first piece of text.
3. Each server, a subprocess on 127.0.0.1, gets the same async clients (httpx) in phases:
   *alone* (the short requests one at a time on the idle server: their latency alone),
   *closed* (``--clients`` clients, each sending its next request when the last is
   answered), *open* (``--open-requests`` arrivals at ``--rate`` per second, latency counted
   from the arrival) and *beside* (4 clients looping long requests while one sends the
   short ones). Sequential generation runs every k-th of the closed phase's requests
   (``--sequential-requests`` of them) in this process, before the servers start.

Prints, per system and phase, tokens/s, time to first token p50/p99 and latency p50/p99
per class, and the ratios the serving work aims at: throughput against transformers' and
against sequential, and short requests' latency beside long ones over their latency alone.
Errors fail the script. Only talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch

CLASSES = {"short": ((8, 64), (4, 32), 3), "medium": ((64, 256), (32, 128), 2), "long": ((256, 512), (128, 256), 1)}
SYLLABLES = "ka lo mi ne tu ra si po de ga vi zo be fu ha je".split()


@dataclasses.dataclass
class Job:
    cls: str
    prompt: str
    prompt_tokens: int
    max_tokens: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


# ------------------------------------------------------------------ model and load


def build_models(preset: str, seq_length: int, tmp: str) -> tuple[str, str]:
    """A random-weight fused model and its Hugging Face export whose tokenizer puts the
    end-of-document token first, as our server does."""
    import sentencepiece as spm

    from mtnlg.formats.fused import save_fused
    from mtnlg.formats.tokenizer import Tokenizer
    from mtnlg.fuse.hf import export_hf
    from mtnlg.model.gpt import GPT
    from mtnlg.model.presets import get_preset

    rng = random.Random(0)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(3000)]
    lines = [" ".join(rng.choices(words, k=20)) for _ in range(4000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=f"{tmp}/sp", vocab_size=1024,
                                   model_type="bpe", eos_id=1, bos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    tok = Tokenizer(f"{tmp}/sp.model")
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset(preset), vocab_size=tok.vocab_size, seq_length=seq_length)
    fused, hf = f"{tmp}/model", f"{tmp}/hf"
    save_fused(GPT(cfg).eval(), fused, tok)
    export_hf(fused, hf)
    with open(f"{hf}/tokenizer.json") as f:
        spec = json.load(f)
    eod = next(t["content"] for t in spec["added_tokens"] if t["id"] == tok.eod_id)
    first, a, b = ({"SpecialToken": {"id": eod, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"Sequence": {"id": "B", "type_id": 1}})
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [first, a], "pair": [first, a, b],
                              "special_tokens": {eod: {"id": eod, "ids": [tok.eod_id], "tokens": [eod]}}}
    with open(f"{hf}/tokenizer.json", "w") as f:
        json.dump(spec, f)
    from transformers import AutoTokenizer

    probe = "kalo mine tu rasi"
    if AutoTokenizer.from_pretrained(hf)(probe)["input_ids"] != [tok.eod_id] + tok.encode(probe):
        raise SystemExit("the export's tokenizer does not give our prompt ids")
    return fused, hf


def make_load(tok, n: int, seed: int, seq_length: int) -> list[Job]:
    rng = random.Random(seed)
    names = [c for c, (_, _, w) in CLASSES.items() for _ in range(w)]
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(500)]
    jobs = []
    for i in range(n):
        cls = names[i % len(names)]
        (plo, phi), (olo, ohi), _ = CLASSES[cls]
        want = rng.randint(plo, phi)
        text = ""
        while len(tok.encode(text)) + 1 < want:
            text += (" " if text else "") + rng.choice(words)
        ids = len(tok.encode(text)) + 1                                 # + the end-of-document token
        out = min(rng.randint(olo, ohi), seq_length - ids)
        jobs.append(Job(cls, text, ids, out))
    rng.shuffle(jobs)
    return jobs


# ------------------------------------------------------------------ clients


class Server:
    def __init__(self, name: str, argv: list[str], model: str, port: int, extra):
        self.name, self.argv, self.model, self.port, self.extra = name, argv, model, port, extra
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def __enter__(self):
        env = {k: v for k, v in os.environ.items() if k != "MTNLG_API_KEY"}
        env["HF_HUB_OFFLINE"] = "1"
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{self.name} did not start")
            time.sleep(0.3)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def body(self, job: Job) -> dict:
        return {"model": self.model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
                "stream": True, **self.extra(job)}


async def ask(client, server: Server, job: Job, start: float | None = None) -> dict:
    """One streamed request: time to first text, latency (from ``start``, default now), text."""
    t0 = time.perf_counter() if start is None else start
    first, text = None, []
    async with client.stream("POST", server.url + "/v1/completions", json=server.body(job)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{server.name}: {chunk['error']}")
            piece = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
            if piece and first is None:
                first = time.perf_counter() - t0
            text.append(piece)
    return {"cls": job.cls, "ttft": first, "latency": time.perf_counter() - t0, "tokens": job.max_tokens,
            "prompt_tokens": job.prompt_tokens, "text": "".join(text)}


async def closed_loop(server: Server, jobs: list[Job], clients: int) -> tuple[list[dict], float]:
    import httpx

    results: list[dict | None] = [None] * len(jobs)
    it = iter(range(len(jobs)))

    async def client_loop(client):
        for i in it:
            results[i] = await ask(client, server, jobs[i])

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=clients + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - t0


async def open_loop(server: Server, jobs: list[Job], rate: float) -> tuple[list[dict], float]:
    import httpx

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=len(jobs) + 4)) as client:
        t0 = time.perf_counter()

        async def arrive(i, job):
            at = t0 + i / rate
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            return await ask(client, server, job, start=at)
        results = await asyncio.gather(*(arrive(i, j) for i, j in enumerate(jobs)))
        return list(results), time.perf_counter() - t0


async def beside(server: Server, shorts: list[Job], longs: list[Job]) -> list[dict]:
    """Short requests one after another while 4 clients keep long requests running."""
    import httpx

    async with httpx.AsyncClient(timeout=900) as client:
        done = asyncio.Event()

        async def long_loop(k):
            i = k
            while not done.is_set():
                await ask(client, server, longs[i % len(longs)])
                i += 4
        loops = [asyncio.create_task(long_loop(k)) for k in range(4)]
        await asyncio.sleep(1.0)  # the long ones are under way
        out = []
        for job in shorts:
            out.append(await ask(client, server, job))
        done.set()
        await asyncio.gather(*loops)
        return out


async def alone(server: Server, jobs: list[Job]) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(timeout=900) as client:
        return [await ask(client, server, j) for j in jobs]


def summary(results: list[dict], wall: float) -> dict:
    out = {"requests": len(results), "prompt_tokens": sum(r["prompt_tokens"] for r in results),
           "tokens": sum(r["tokens"] for r in results), "wall_s": round(wall, 2),
           "tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1)}
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    out["ttft_p50_s"], out["ttft_p99_s"] = _pct(ttft, 50), _pct(ttft, 99)
    for cls in CLASSES:
        lat = [r["latency"] for r in results if r["cls"] == cls]
        if lat:
            out[f"{cls}_p50_s"], out[f"{cls}_p99_s"] = _pct(lat, 50), _pct(lat, 99)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def sequential(model_dir: str, jobs: list[Job]) -> tuple[list[dict], float]:
    from mtnlg.formats.fused import load_fused
    from mtnlg.model.decode import generate

    model, _, tok = load_fused(model_dir)
    generate(model, tok, jobs[0].prompt, max_new_tokens=4)  # warm-up
    results, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for j in jobs:
            t = time.perf_counter()
            first = []
            text = generate(model, tok, j.prompt, max_new_tokens=j.max_tokens, min_new_tokens=j.max_tokens,
                            on_token=lambda s: first.append(time.perf_counter() - t) if not first else None)
            results.append({"cls": j.cls, "ttft": first[0] if first else None, "latency": time.perf_counter() - t,
                            "tokens": j.max_tokens, "prompt_tokens": j.prompt_tokens, "text": text})
    return results, time.perf_counter() - t0


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-20m")
    p.add_argument("--seq-length", type=int, default=1024, help="the random model's window (prompt + output)")
    p.add_argument("--systems", default="mtnlg,transformers,sequential")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=36, help="requests of the closed loop (and of sequential)")
    p.add_argument("--sequential-requests", type=int, default=12,
                   help="how many of the closed loop's requests sequential generation runs (every k-th)")
    p.add_argument("--open-requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=2.0, help="open-loop arrivals per second")
    p.add_argument("--short", type=int, default=6, help="short requests of the alone and beside phases")
    p.add_argument("--max-batch-size", type=int, default=16, help="mtnlg serve's slots")
    p.add_argument("--max-prefill-tokens", type=int, default=256,
                   help="tokens of prompt per step: mtnlg serve's --max-prefill-tokens, transformers' "
                        "--cb-max-batch-tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of every system (OMP_NUM_THREADS of the servers; default torch's own)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    systems = args.systems.split(",")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers inherit it
        torch.set_num_threads(args.threads)

    from mtnlg.formats.tokenizer import Tokenizer

    res: dict = {"args": vars(args), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="mtnlg-bench-serve-") as tmp:
        fused, hf = build_models(args.preset, args.seq_length, tmp)
        tok = Tokenizer.from_dir(fused)
        jobs = make_load(tok, args.requests, args.seed, args.seq_length)
        opened = make_load(tok, args.open_requests, args.seed + 1, args.seq_length)
        pool = make_load(tok, 60, args.seed + 2, args.seq_length)
        shorts = [j for j in pool if j.cls == "short"][:args.short]
        longs = [j for j in pool if j.cls == "long"]
        texts: dict[str, list[str]] = {}

        if "sequential" in systems:
            every = max(1, len(jobs) // max(1, args.sequential_requests))
            results, wall = sequential(fused, jobs[::every][:args.sequential_requests])
            res["sequential"] = {"closed": summary(results, wall)}
            texts["sequential"] = [r["text"] for r in results]
            print("sequential", json.dumps(res["sequential"]), flush=True)

        servers = {
            "mtnlg": lambda port: Server(
                "mtnlg serve", [sys.executable, "-m", "mtnlg.cli", "serve", fused, "--port", str(port),
                                "--served-model-name", "bench", "--max-batch-size", str(args.max_batch_size),
                                "--max-queue", str(max(64, args.open_requests + args.clients)),
                                "--max-prefill-tokens", str(args.max_prefill_tokens)],
                "bench", port, lambda j: {"min_tokens": j.max_tokens}),
            "transformers": lambda port: Server(
                "transformers serve", [shutil.which("transformers", path=os.path.dirname(sys.executable))
                                       or "transformers", "serve", hf, "--continuous-batching", "--device", "cpu",
                                       "--host", "127.0.0.1", "--port", str(port),
                                       # its paged cache bounded as ours is (slots x window), else it
                                       # takes a share of the machine's memory (13 GB seen here)
                                       "--cb-block-size", "32",
                                       "--cb-num-blocks", str(args.max_batch_size * args.seq_length // 32),
                                       "--cb-max-batch-tokens", str(args.max_prefill_tokens)],
                hf, port, lambda j: {"generation_config": json.dumps(
                    {"max_new_tokens": j.max_tokens, "min_new_tokens": j.max_tokens, "do_sample": False})}),
        }
        for name in [s for s in systems if s in servers]:
            with servers[name](_free_port()) as server:
                t = time.perf_counter()
                asyncio.run(alone(server, [Job("short", "kalo", 2, 4)]))  # warm-up (transformers: its cache)
                warm = time.perf_counter() - t
                out: dict = {"warmup_s": round(warm, 1)}
                lone = asyncio.run(alone(server, shorts))
                out["alone"] = summary(lone, sum(r["latency"] for r in lone))
                results, wall = asyncio.run(closed_loop(server, jobs, args.clients))
                out["closed"] = summary(results, wall)
                texts[name] = [r["text"] for r in results]
                results, wall = asyncio.run(open_loop(server, opened, args.rate))
                out["open"] = summary(results, wall)
                near = asyncio.run(beside(server, shorts, longs))
                out["beside"] = summary(near, sum(r["latency"] for r in near))
                out["short_beside_over_alone"] = round(out["beside"]["short_p50_s"] / out["alone"]["short_p50_s"], 2)
                out["short_closed_over_alone"] = round(out["closed"]["short_p50_s"] / out["alone"]["short_p50_s"], 2)
                res[name] = out
                print(name, json.dumps(out), flush=True)

    def tps(name, phase="closed"):
        return res.get(name, {}).get(phase, {}).get("tokens_per_s")
    if tps("mtnlg") and tps("transformers"):
        res["mtnlg_over_transformers_closed"] = round(tps("mtnlg") / tps("transformers"), 2)
        res["mtnlg_over_transformers_open"] = round(tps("mtnlg", "open") / tps("transformers", "open"), 2)
        pairs = list(zip(texts["mtnlg"], texts["transformers"]))
        res["same_text_as_transformers"] = f"{sum(a.strip() == b.strip() for a, b in pairs)}/{len(jobs)}"
        # greedy on random weights: near-ties, so different kernels part ways at some token
        shared = [len(os.path.commonprefix([a.strip(), b.strip()])) / max(1, len(a.strip())) for a, b in pairs]
        res["common_prefix_with_transformers"] = round(sum(shared) / len(shared), 2)
    if tps("mtnlg") and tps("sequential"):
        res["mtnlg_over_sequential"] = round(tps("mtnlg") / tps("sequential"), 2)
        every = max(1, len(jobs) // max(1, args.sequential_requests))
        same = sum(a.strip() == b.strip() for a, b in zip(texts["mtnlg"][::every], texts["sequential"]))
        res["same_text_as_sequential"] = f"{same}/{len(texts['sequential'])}"
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in res.items() if k not in systems and k != "args"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
