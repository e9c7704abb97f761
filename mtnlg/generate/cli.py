"""``mtnlg generate MODEL --prompt TEXT [--max-new-tokens N --temperature T --top-k K --top-p P --seed S] [--chat]``.

Greedy by default (``--temperature 0``); the continuation streams to stdout as it is
generated. ``--chat`` starts an interactive conversation instead (see docs/generate.md).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="fused model directory (from `mtnlg fuse`), local, gs:// or s3://")
    p.add_argument("--prompt", default=None, help="text to continue (required unless --chat)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (the default; 0.7 with --chat); >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus: keep tokens up to this mass (default 1 = off; 0.9 with --chat)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--chat", action="store_true", help="interactive chat in the terminal")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def main(args: argparse.Namespace) -> int:
    from mtnlg.formats.fused import load_fused
    from mtnlg.model.decode import generate

    if not args.chat and args.prompt is None:
        raise ValueError("--prompt is required (or use --chat)")
    model, _, tok = load_fused(args.model, device=args.device)
    if args.chat:
        from mtnlg.generate.chat import chat

        chat(model, tok, system=args.system, max_new_tokens=args.max_new_tokens,
             temperature=0.7 if args.temperature is None else args.temperature, top_k=args.top_k,
             top_p=0.9 if args.top_p is None else args.top_p, seed=args.seed)
        return 0
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens,
             temperature=0.0 if args.temperature is None else args.temperature, top_k=args.top_k,
             top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed, stop_at_eod=not args.no_stop,
             on_token=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")
    return 0
