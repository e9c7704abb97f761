"""``mtnlg evaluate MODEL --data TOKENIZED_DIR [--output DIR] [--train-log log.jsonl] [--lm-eval] [KEY=VALUE ...]``.

Flags cover the usual settings; ``KEY=VALUE`` overrides set any field of ``EvaluateConfig``
(e.g. ``temperature=0 repetition_penalty=1.2``), as the pipeline's ``evaluate_overrides`` do.
"""

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
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per sample generation (default 40)")
    p.add_argument("--lm-eval", action="store_true",
                   help="also run lm-evaluation-harness (--model hf) on MODEL/hf with the cloze items")
    p.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                   help="sample-generation prompt (repeatable; default: a fixed set)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="EvaluateConfig fields, e.g. temperature=0")


def main(args: argparse.Namespace) -> int:
    from mtnlg import storage
    from mtnlg.evaluate.config import EvaluateConfig
    from mtnlg.evaluate.evaluate import evaluate_model

    from mtnlg.config import load_config

    output = args.output or storage.join(args.model, "eval")
    flags = [f"batch_size={args.batch_size}", f"max_cloze_items={args.max_cloze_items}", f"device={args.device}"]
    if args.max_new_tokens is not None:
        flags.append(f"max_new_tokens={args.max_new_tokens}")
    if args.lm_eval:
        flags.append("run_lm_eval=true")
    config = load_config(EvaluateConfig, None, flags + list(args.overrides))
    if args.prompts:
        config.prompts = list(args.prompts)
    result = evaluate_model(args.model, args.data, output, train_log=args.train_log, config=config)
    keys = ("val_loss", "val_perplexity", "val_bits_per_byte", "val_tokens", "cloze_accuracy", "cloze_items",
            "lm_eval_cloze_accuracy", "lm_eval_cloze_items")
    print(json.dumps({k: result[k] for k in keys if k in result} | {"report": result["files"]["html"]}, indent=2))
    return 0
