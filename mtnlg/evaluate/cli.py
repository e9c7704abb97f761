"""``mtnlg evaluate MODEL --data TOKENIZED_DIR [--output DIR] [--train-log log.jsonl]``."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="fused model directory (from `mtnlg fuse`), local, gs:// or s3://")
    p.add_argument("--data", required=True, help="tokenized directory (from `mtnlg tokenize`); its validation split is used")
    p.add_argument("--output", "-o", default=None, help="report directory (default MODEL/eval)")
    p.add_argument("--train-log", default=None, help="the training run's log.jsonl, for the loss curve")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-cloze-items", type=int, default=500, help="last-word items to build (default 500)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sample generation (default 32)")
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="sample-generation prompt (repeatable; default: a fixed set)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def main(args: argparse.Namespace) -> int:
    from mtnlg import storage
    from mtnlg.evaluate.config import EvaluateConfig
    from mtnlg.evaluate.evaluate import evaluate_model

    output = args.output or storage.join(args.model, "eval")
    config = EvaluateConfig(batch_size=args.batch_size, max_cloze_items=args.max_cloze_items,
                            max_new_tokens=args.max_new_tokens, device=args.device,
                            **({"prompts": list(args.prompts)} if args.prompts else {}))
    result = evaluate_model(args.model, args.data, output, train_log=args.train_log, config=config)
    keys = ("val_loss", "val_perplexity", "val_tokens", "cloze_accuracy", "cloze_items")
    print(json.dumps({k: result[k] for k in keys if k in result} | {"report": result["files"]["html"]}, indent=2))
    return 0
