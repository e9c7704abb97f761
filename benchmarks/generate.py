"""Generation speed: our KV-cache decoding next to ``transformers``' ``generate`` on the
exported Hugging Face model, same weights, same settings, same run.

    .venv/bin/python benchmarks/generate.py                       # small-20m, GPT-2 layout, CPU
    .venv/bin/python benchmarks/generate.py --variant llama --device cuda --dtype bf16

1. Builds a model of ``--preset`` size (random weights: speed does not depend on them) in
   the ``--variant`` layout (``gpt2``: learned positions + LayerNorm + GeLU; ``llama``:
   rotary + RMSNorm + SwiGLU + grouped-query heads), saves it as a fused model directory
   and exports it with ``mtnlg.fuse.hf.export_hf`` (which checks the logits match).
2. Loads ours with ``load_fused`` (as ``mtnlg generate`` does) and HF's with
   ``from_pretrained``. Greedy decoding of ``--new-tokens`` tokens after a ``--prompt-tokens`` prompt, batch 1,
   no early stop, with both: ``mtnlg.generate.generate_ids`` (our cache) and
   ``AutoModelForCausalLM.generate(do_sample=False, use_cache=True)``. Both must produce
   the same tokens (the script fails otherwise).
3. One warm-up each, then ``--repeat`` alternating timed runs; the best of each is
   reported as new tokens per second (prefill included), and the ratio ours / HF.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

VARIANTS = {
    "gpt2": dict(position="learned", norm="layernorm", activation="gelu", tie_embeddings=True, bias=True),
    "llama": dict(position="rotary", norm="rmsnorm", activation="swiglu", tie_embeddings=False, bias=False),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-20m")
    p.add_argument("--variant", default="gpt2", choices=sorted(VARIANTS))
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.threads:
        torch.set_num_threads(args.threads)

    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    from mtnlg.formats.fused import load_fused
    from mtnlg.formats.sharded_safetensors import FUSE_DTYPES
    from mtnlg.formats.tokenizer import Tokenizer
    from mtnlg.formats.fused import save_fused
    from mtnlg.fuse.hf import export_hf
    from mtnlg.model.decode import generate_ids
    from mtnlg.model.gpt import GPT
    from mtnlg.model.presets import get_preset
    from mtnlg.model.sampling import SamplingConfig

    kw = dict(VARIANTS[args.variant])
    base = get_preset(args.preset)
    if args.variant == "llama":
        kw["num_kv_heads"] = max(1, base.num_heads // 2)
    dtype = FUSE_DTYPES[args.dtype]
    with tempfile.TemporaryDirectory(prefix="mtnlg-bench-gen-") as tmp:
        # a throwaway tokenizer: the model directory needs one; ids are drawn at random
        text = "the quick brown fox jumps over the lazy dog " * 200
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("dog")), model_prefix=f"{tmp}/sp",
                                       vocab_size=64, model_type="bpe", eos_id=1, bos_id=-1, pad_id=-1,
                                       minloglevel=2)
        tok = Tokenizer(f"{tmp}/sp.model")
        cfg = dataclasses.replace(base, dropout=0.0, attention_dropout=0.0, **kw)
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        save_fused(model, f"{tmp}/model", tok)
        export_hf(f"{tmp}/model", f"{tmp}/hf")
        # ours as users get it: the fused directory through load_fused
        ours, _, _ = load_fused(f"{tmp}/model", device=args.device, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(f"{tmp}/hf", dtype=dtype).to(args.device).eval()

        if args.prompt_tokens + args.new_tokens > cfg.seq_length:  # HF has no sliding window
            args.new_tokens = cfg.seq_length - args.prompt_tokens
            print(f"note: --new-tokens capped at {args.new_tokens} (seq_length {cfg.seq_length})", file=sys.stderr)
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(2, cfg.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        sampling = SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eod=False)
        x = torch.tensor([prompt], device=args.device)

        def run_ours() -> list[int]:
            return generate_ids(ours, prompt, sampling, vocab_size=cfg.padded_vocab_size(1))

        def run_hf() -> list[int]:
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                                  eos_token_id=None, pad_token_id=0)
            return out[0, len(prompt):].tolist()

        a, b = run_ours(), run_hf()  # warm-up, and the same tokens from both
        if a != b:
            same = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
            msg = f"greedy tokens differ from position {same} (ours {a[same:same + 5]}, HF {b[same:same + 5]})"
            if args.dtype == "fp32":
                raise SystemExit(msg)
            print(f"note: {msg}; expected at low precision", file=sys.stderr)
        best = {"mtnlg": float("inf"), "transformers": float("inf")}
        for _ in range(args.repeat):
            for name, fn in (("mtnlg", run_ours), ("transformers", run_hf)):
                _sync(args.device)
                t0 = time.perf_counter()
                out = fn()
                _sync(args.device)
                best[name] = min(best[name], time.perf_counter() - t0)
                assert len(out) == args.new_tokens
    n = args.new_tokens
    result = {
        "preset": args.preset, "variant": args.variant, "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens, "new_tokens": n,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mtnlg_tokens_per_s": n / best["mtnlg"], "transformers_tokens_per_s": n / best["transformers"],
    }
    result["speedup"] = result["mtnlg_tokens_per_s"] / result["transformers_tokens_per_s"]
    print(json.dumps(result, indent=2))
    print(f"{args.preset} {args.variant} on {args.device} ({args.dtype}): mtnlg {result['mtnlg_tokens_per_s']:.1f} "
          f"tokens/s, transformers {result['transformers_tokens_per_s']:.1f} tokens/s, "
          f"{result['speedup']:.2f}x")
    return result


if __name__ == "__main__":
    main()
