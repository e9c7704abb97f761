"""The run's data: training (optionally blended) and validation samples from a tokenized
directory, and the vocabulary size its tokenizer fixes."""

from __future__ import annotations

import dataclasses
import json
import os

from mtnlg import storage
from mtnlg.formats.rundir import TOKENIZER_META
from mtnlg.progress import get_logger

log = get_logger("mtnlg.train")


def with_tokenizer_vocab(cfg, verbose: bool):
    """``cfg`` with ``model.vocab_size`` taken from ``data.path/tokenizer.json``: the
    model's vocabulary is the tokenizer's (the config's value stands when there is none)."""
    path = storage.join(cfg.data.path, TOKENIZER_META)
    if not storage.exists(path):
        if verbose:
            log.warning("%s has no %s; using model.vocab_size=%d as is", cfg.data.path, TOKENIZER_META,
                        cfg.model.vocab_size)
        return cfg
    try:
        vocab = int(json.loads(storage.read_text(path))["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: no readable vocab_size: {e}") from None
    if vocab == cfg.model.vocab_size:
        return cfg
    if verbose:
        log.info("model.vocab_size=%d (from %s/%s; the config said %d)", vocab, cfg.data.path, TOKENIZER_META,
                 cfg.model.vocab_size)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def _prefixes(d) -> tuple[list[str], list[float], str]:
    if d.blend:
        prefixes = [b.prefix if (storage.is_remote(b.prefix) or os.path.isabs(b.prefix))
                    else storage.join(d.path, b.prefix) for b in d.blend]
        weights = [b.weight for b in d.blend]
    else:
        prefixes, weights = [storage.join(d.path, d.train_prefix)], [1.0]
    return prefixes, weights, storage.join(d.path, d.valid_prefix)


def open_datasets(data, seq_length: int, want_valid: bool):
    """``(train, validation or None)`` datasets for the ``DataConfig`` ``data``; gs:// and s3:// data
    is fetched and cached locally by ``GPTDataset`` itself. A missing file is named."""
    from mtnlg.train.gpt_dataset import BlendedDataset, GPTDataset

    train_prefixes, weights, valid_prefix = _prefixes(data)
    for prefix in train_prefixes + ([valid_prefix] if want_valid else []):
        for ext in (".bin", ".idx"):
            if storage.exists(prefix + ext):
                continue
            if prefix == valid_prefix and want_valid:
                raise FileNotFoundError(f"validation data {prefix + ext} not found (set data.valid_prefix, "
                                        "or train.eval_iters=0 to skip validation)")
            raise FileNotFoundError(f"training data {prefix + ext} not found (data.path={data.path!r})")
    trains = [GPTDataset(p, seq_length, data.seed) for p in train_prefixes]
    train = trains[0] if len(trains) == 1 else BlendedDataset(trains, weights, data.seed)
    return train, (GPTDataset(valid_prefix, seq_length, data.seed) if want_valid else None)
