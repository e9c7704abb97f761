"""``mtnlg tokenize EXTRACTED_DIR --output DIR``: train a tokenizer, write Megatron token files.

Options come from ``--config FILE`` (YAML of ``TokenizeConfig`` fields), then ``key=value``
overrides, then the flags (``--vocab-size``, ``--tokenizer``, ``--workers``).
"""

from __future__ import annotations

import argparse
import json


class _IntermixedParser(argparse.ArgumentParser):
    """Accepts ``key=value`` overrides after the options, as in ``DIR --output X key=value``.

    Plain argparse assigns positionals in one go up to the first option, so overrides that
    follow ``--output`` would be rejected; intermixed parsing collects them wherever they are.
    """

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.__class__ = _IntermixedParser
    parser.add_argument("input", metavar="EXTRACTED_DIR",
                        help="output of mtnlg extract: DIR/train/*.jsonl, DIR/validation/*.jsonl "
                             "(local, gs:// or s3://)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="where to write tokenizer.model, <split>.bin/.idx, stats.json")
    parser.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size to train")
    parser.add_argument("--tokenizer", metavar="MODEL",
                        help="reuse this SentencePiece .model instead of training one")
    parser.add_argument("--workers", type=int, metavar="N", help="encoding processes (0 = all cores)")
    parser.add_argument("--config", metavar="FILE", help="YAML file of TokenizeConfig fields")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="TokenizeConfig overrides, e.g. model_type=unigram byte_fallback=false")


def main(args: argparse.Namespace) -> int:
    from mtnlg.config import load_config
    from mtnlg.tokenize.config import TokenizeConfig
    from mtnlg.tokenize.tokenize import tokenize

    overrides = list(args.overrides)
    if args.vocab_size is not None:
        overrides.append(f"vocab_size={args.vocab_size}")
    if args.tokenizer is not None:
        overrides.append(f"tokenizer={args.tokenizer}")
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    config = load_config(TokenizeConfig, args.config, overrides)
    stats = tokenize(args.input, args.output, config)
    summary = {k: stats[k] for k in ("output", "vocab_size", "documents", "tokens",
                                     "tokens_per_document", "skipped", "tokens_per_s", "seconds")}
    summary["splits"] = {s: {"documents": v["documents"], "tokens": v["tokens"]}
                         for s, v in stats["splits"].items()}
    print(json.dumps(summary, indent=2))
    return 0
