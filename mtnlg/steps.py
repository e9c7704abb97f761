"""One function per pipeline step: what a kfp component calls, and nothing else.

Each takes plain values (paths/URIs, ``key=value`` override lists) and returns a dict of
results, so it can be run and tested without kfp. The components in
``mtnlg.components`` are a few lines around these.
"""

from __future__ import annotations

from typing import Any


def extract_step(inputs: list[str], output: str, overrides: list[str] | None = None,
                 workers: int = 2, beam_args: list[str] | None = None) -> dict[str, Any]:
    """Clean, filter, deduplicate and split ``inputs`` into ``output`` (see docs/extract.md)."""
    from mtnlg.config import load_config
    from mtnlg.extract.config import ExtractConfig
    from mtnlg.extract.beam_job import extract

    cfg = load_config(ExtractConfig, None, list(overrides or []))
    return extract(list(inputs), output, cfg, list(beam_args or []), workers=workers)


def tokenize_step(extracted: str, output: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train a tokenizer and write Megatron ``.bin/.idx`` files (see docs/tokenize.md)."""
    from mtnlg.config import load_config
    from mtnlg.tokenize.config import TokenizeConfig
    from mtnlg.tokenize.tokenize import tokenize

    cfg = load_config(TokenizeConfig, None, list(overrides or []))
    return tokenize(extracted, output, cfg)


def train_step(tokenized: str, output: str, recipe: str = "debug", overrides: list[str] | None = None,
               nproc: int = 2) -> dict[str, Any]:
    """Train a GPT on ``tokenized`` with ``nproc`` local processes (see docs/train.md)."""
    from mtnlg.train.launch import run_local

    args = [f"data.path={tokenized}", f"output={output}", *(overrides or [])]
    return run_local(args, recipe=recipe, nproc=nproc)


def fuse_step(checkpoint_run_dir: str, output: str, hf: bool = True, dtype: str = "fp32") -> dict[str, Any]:
    """Merge the run's latest checkpoint into one model directory (see docs/fuse.md)."""
    from mtnlg.fuse.fuse import fuse_checkpoint

    return fuse_checkpoint(checkpoint_run_dir, output, dtype=dtype, hf=hf)


def evaluate_step(model_dir: str, tokenized: str, output: str, train_log: str | None) -> dict[str, Any]:
    """Perplexity, last-word accuracy, samples and the report (see docs/evaluate.md)."""
    from mtnlg.evaluate.evaluate import evaluate_model

    return evaluate_model(model_dir, tokenized, output, train_log=train_log)
