"""``mtnlg extract INPUT... --output DIR [--config FILE] [KEY=VALUE...] [--workers N] [-- BEAM OPTIONS]``."""

from __future__ import annotations

import argparse
import json
import re
import types

# An override looks like ``filters.min_words=20``; a path with '=' in it has a '/' before it.
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="+", metavar="INPUT|KEY=VALUE",
                        help="input files, directories or globs (local, gs:// or s3://), and config overrides "
                             "such as filters.min_words=20 or dedup.threshold=0.7")
    parser.add_argument("--output", "-o", required=True, help="output directory (local, gs:// or s3://)")
    parser.add_argument("--config", help="YAML file of ExtractConfig fields (overrides apply on top)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DirectRunner worker processes (1 = in-process); ignored with another runner "
                             "(default: 2)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # argparse takes positionals only in one run, so "IN --output D key=value" would reject
    # the override; this parser gathers such stray positionals into ``items`` instead.
    parser.parse_known_args = types.MethodType(_parse_known_args_intermixed, parser)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("Options after a bare '--' go to Beam unchanged, e.g. "
                     "\n  -- --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp\n"
                     "See docs/extract.md for the config keys and stats.json.")


def _parse_known_args_intermixed(self: argparse.ArgumentParser, args=None, namespace=None):
    ns, extras = argparse.ArgumentParser.parse_known_args(self, args, namespace)
    ns.items = list(getattr(ns, "items", None) or []) + [a for a in extras if not a.startswith("-")]
    return ns, [a for a in extras if a.startswith("-")]


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """(inputs, overrides) from the positional arguments."""
    inputs = [i for i in items if not _OVERRIDE.match(i)]
    overrides = [i for i in items if _OVERRIDE.match(i)]
    return inputs, overrides


def main(args: argparse.Namespace) -> int:
    from mtnlg.config import dump_yaml, load_config
    from mtnlg.extract.config import ExtractConfig

    inputs, overrides = split_items(args.items)
    cfg = load_config(ExtractConfig, args.config, overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    if not inputs:
        raise ValueError("no input given (only KEY=VALUE overrides)")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")

    from mtnlg.extract import stats as st
    from mtnlg.extract.beam_job import extract

    stats = extract(inputs, args.output, cfg, list(getattr(args, "passthrough", []) or []), workers=args.workers)
    print(st.summary(stats))
    print(json.dumps({k: stats[k] for k in ("read", "kept", "bytes_in", "bytes_out")}))
    print(f"wrote {args.output} (train/, validation/, stats.json)")
    return 0
