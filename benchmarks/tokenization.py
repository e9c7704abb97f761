"""Throughput of the tokenize step against a bare SentencePiece encode loop (its limit).

    .venv/bin/python benchmarks/tokenization.py [--mb 50] [--workers 2] [--vocab-size 8000]

1. Builds about ``--mb`` MB of JSONL from the bundled Python-docs corpus (HTML pages with the
   tags stripped, plus the reStructuredText "What's New" pages; split into documents of a few
   paragraphs, repeated until the size is reached).
2. Trains one tokenizer (BPE, ``--vocab-size``) on a sample; both contenders use it.
3. Bare limit: ``sp.encode(batch, num_threads=W)`` over the texts already in memory.
   The step: ``mtnlg.tokenize.tokenize.tokenize`` with that tokenizer and ``W`` workers, timed
   end to end (process pool start, reading JSONL, encoding, writing .bin/.idx and stats).
   Each runs ``--repeat`` times, alternating; the best of each is reported.
4. Builds the GPT sample index for ``--index-samples`` samples (document lengths resampled
   from the tokenized corpus) and times it, then the cache write and a cached load.
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's ``tokenize``, which numpy imports indirectly;
# drop the script's own directory from the import path so that the real one is found.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import glob
import gzip
import html
import json
import re
import resource
import shutil
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(_HERE)
sys.path.insert(0, ROOT)

from mtnlg.formats.indexed_dataset import IndexedDataset  # noqa: E402
from mtnlg.tokenize.config import TokenizeConfig  # noqa: E402
from mtnlg.tokenize.tokenize import tokenize, train_tokenizer  # noqa: E402
from mtnlg.train.gpt_dataset import GPTDataset, build_epoch_index  # noqa: E402

CORPUS = os.path.join(ROOT, "data", "corpus", "python-docs")


def corpus_documents(doc_chars: int = 1500) -> list[str]:
    """Plain-text documents from the bundled corpus (crude HTML stripping is enough here)."""
    docs = []
    for path in sorted(glob.glob(os.path.join(CORPUS, "**", "*.gz"), recursive=True)):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        if path.endswith(".html.gz"):
            text = re.sub(r"(?s)<(script|style)\b.*?</\1>", "", text)
            text = html.unescape(re.sub(r"<[^>]+>", "", text))
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        cur, n = [], 0
        for p in paras:
            cur.append(p)
            n += len(p)
            if n >= doc_chars:
                docs.append("\n\n".join(cur))
                cur, n = [], 0
        if cur:
            docs.append("\n\n".join(cur))
    return docs


def write_jsonl(root: str, docs: list[str], target_bytes: int, parts: int = 4) -> list[str]:
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    lines, total, rep = [], 0, 0
    while total < target_bytes:
        for i, d in enumerate(docs):
            line = json.dumps({"id": f"{rep}-{i}", "text": d, "source": "python-docs"}) + "\n"
            lines.append(line)
            total += len(line.encode())
            if total >= target_bytes:
                break
        rep += 1
    per = -(-len(lines) // parts)
    for p in range(parts):
        with open(os.path.join(root, "train", f"part-{p:05d}-of-{parts:05d}.jsonl"), "w") as f:
            f.writelines(lines[p * per:(p + 1) * per])
    return [json.loads(x)["text"] for x in lines]


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare_encode(sp, texts: list[str], threads: int, batch: int = 1000) -> tuple[float, int, float]:
    """Seconds, tokens and CPU seconds of encoding ``texts`` in batches (the limit)."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    tokens = 0
    for i in range(0, len(texts), batch):
        ids = sp.encode(texts[i:i + batch], num_threads=threads)
        tokens += sum(map(len, ids)) + len(ids)  # + one end-of-document token each, as the step
    return time.perf_counter() - t0, tokens, cpu_seconds() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--index-samples", type=int, default=10_000_000)
    ap.add_argument("--seq-length", type=int, default=2048)
    args = ap.parse_args()

    import sentencepiece as spm

    work = tempfile.mkdtemp(prefix="mtnlg-bench-tokenize-")
    try:
        t0 = time.perf_counter()
        src = os.path.join(work, "extracted")
        texts = write_jsonl(src, corpus_documents(), int(args.mb * 1e6))
        nbytes = sum(os.path.getsize(f) for f in glob.glob(os.path.join(src, "train", "*")))
        print(f"corpus: {len(texts):,} documents, {nbytes / 1e6:.1f} MB JSONL "
              f"({time.perf_counter() - t0:.1f}s to build)")
        cfg = TokenizeConfig(vocab_size=args.vocab_size, train_sample_bytes=8 << 20)
        t0 = time.perf_counter()
        tok, info = train_tokenizer(sorted(glob.glob(os.path.join(src, "train", "*.jsonl"))), cfg)
        model = os.path.join(work, "bench.model")
        with open(model, "wb") as f:
            f.write(tok.model_bytes)
        print(f"tokenizer: BPE {tok.vocab_size} trained on {info['sample_bytes'] / 1e6:.1f} MB "
              f"in {time.perf_counter() - t0:.1f}s")
        sp = spm.SentencePieceProcessor(model_file=model)

        bare, step = [], []
        step_cfg = TokenizeConfig(tokenizer=model, workers=args.workers, splits=["train"])
        for r in range(args.repeat):
            bare.append(bare_encode(sp, texts, args.workers))
            out = os.path.join(work, f"tokens{r}")
            t0, c0 = time.perf_counter(), cpu_seconds()
            stats = tokenize(src, out, step_cfg)
            step.append((time.perf_counter() - t0, stats["tokens"], cpu_seconds() - c0))
        b_s, b_tok, b_cpu = min(bare)
        s_s, s_tok, s_cpu = min(step)
        assert b_tok == s_tok, (b_tok, s_tok)
        docs = len(texts)
        print(f"\nbare sentencepiece encode ({args.workers} threads): {docs / b_s:,.0f} docs/s, "
              f"{b_tok / b_s:,.0f} tokens/s, {nbytes / b_s / 1e6:.1f} MB/s "
              f"({b_s:.2f}s, {b_cpu:.2f} CPU-s)")
        print(f"mtnlg tokenize ({args.workers} workers, read+encode+write): {docs / s_s:,.0f} docs/s, "
              f"{s_tok / s_s:,.0f} tokens/s, {nbytes / s_s / 1e6:.1f} MB/s "
              f"({s_s:.2f}s, {s_cpu:.2f} CPU-s)")
        print(f"ratio tokenize / bare encode: {b_s / s_s:.2f}x tokens/s "
              f"(runs: bare {', '.join(f'{x[0]:.2f}' for x in bare)} s; "
              f"tokenize {', '.join(f'{x[0]:.2f}' for x in step)} s); "
              f"{b_cpu / s_cpu:.2f}x in tokens per CPU-second")

        if args.index_samples <= 0:
            return
        # ---- sample index for many samples, with realistic document lengths
        lengths = IndexedDataset(os.path.join(work, "tokens0", "train")).sizes
        need = args.index_samples * args.seq_length + 1
        rng = np.random.default_rng(0)
        n_docs = int(need / lengths.mean() * 1.02) + 1
        sizes = rng.choice(lengths, size=n_docs).astype(np.int32)
        while int(sizes.sum(dtype=np.int64)) < need:
            sizes = np.concatenate([sizes, rng.choice(lengths, size=n_docs // 50 + 1).astype(np.int32)])
        total = int(sizes.sum(dtype=np.int64))
        n_samples = (total - 1) // args.seq_length
        t0 = time.perf_counter()
        arrays = build_epoch_index(sizes, args.seq_length, 1234, 0)
        build_s = time.perf_counter() - t0
        cache = os.path.join(work, "index-cache")
        t0 = time.perf_counter()
        GPTDataset._save(cache, "bench", arrays)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = [np.load(os.path.join(cache, "bench", f + ".npy"), mmap_mode="r")
                  for f in ("doc_idx", "sample_idx", "shuffle_idx")]
        load_s = time.perf_counter() - t0
        assert loaded[1].shape == (n_samples + 1, 2)
        print(f"\nsample index: {n_samples:,} samples of {args.seq_length} tokens over {n_docs:,} documents "
              f"({total / 1e9:.1f} B tokens): built in {build_s:.2f}s, cached in {save_s:.2f}s, "
              f"loaded from cache in {load_s * 1e3:.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
