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


def open_datasets_per_node(data, seq_length: int, want_valid: bool, local_rank: int):
    """:func:`open_datasets` by each node's local rank 0 first (it downloads gs:// / s3://
    data into the node's cache and builds the sample index there), then, after a barrier,
    by the node's other ranks, which find both in the cache: one download and one index
    build per node, not per rank. Collective."""
    from mtnlg.dist import barrier

    out = open_datasets(data, seq_length, want_valid) if local_rank == 0 else None
    barrier()
    if out is None:
        out = open_datasets(data, seq_length, want_valid)
    return out


def preflight_problems(cfg) -> list[str]:
    """What would stop a run before its processes start, all at once: the data files, the
    tokenizer, the output's writability, the checkpoint to resume from. Empty: go."""
    from mtnlg.formats import checkpoint as ckpt
    from mtnlg.formats.rundir import TOKENIZER_MODEL

    problems: list[str] = []
    d = cfg.data
    if not d.path:
        return ["data.path is not set (the output of `mtnlg tokenize`)"]
    train_prefixes, _, valid_prefix = _prefixes(d)
    want_valid = cfg.train.eval_iters > 0
    try:
        for prefix in train_prefixes + ([valid_prefix] if want_valid else []):
            missing = [prefix + ext for ext in (".bin", ".idx") if not storage.exists(prefix + ext)]
            if missing:
                what = "validation data" if prefix == valid_prefix else "training data"
                hint = " (or train.eval_iters=0 to skip validation)" if prefix == valid_prefix else ""
                problems.append(f"{what} {', '.join(missing)} not found (data.path={d.path!r}){hint}")
        for name in (TOKENIZER_META, TOKENIZER_MODEL):
            if not storage.exists(storage.join(d.path, name)):
                problems.append(f"tokenizer file {storage.join(d.path, name)} not found: data.path must be "
                                "a directory written by `mtnlg tokenize`")
    except Exception as e:  # noqa: BLE001 - unreachable storage is a problem to report, not a crash
        problems.append(f"data.path={d.path!r} cannot be read: {type(e).__name__}: {e}")
    if cfg.output:
        probe = storage.join(cfg.output, ".mtnlg-write-probe")
        try:
            storage.write_text(probe, "ok\n")
            storage.remove(probe)
        except Exception as e:  # noqa: BLE001
            problems.append(f"output={cfg.output!r} is not writable: {type(e).__name__}: {e}")
    spec = cfg.checkpoint.load.strip()
    if spec.lower() not in ("", "none", "auto", "latest"):  # auto/latest: the ranks pick an intact one
        try:
            path = ckpt.resolve_checkpoint(spec)
            if not storage.is_remote(path):  # a remote one is verified as it loads (ranged reads)
                damage = ckpt.verify_checkpoint(path)
                if damage:
                    problems.append(f"checkpoint.load={spec!r}: {path} is damaged: {'; '.join(damage)}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"checkpoint.load={spec!r}: {e}")
    if not any(p.startswith("checkpoint.load=") for p in problems):
        from mtnlg.config import ConfigError
        from mtnlg.train.checkpointer import check_resume

        try:  # the checkpoint's model against the run's: shapes and vocabulary padding
            check_resume(cfg)
        except (ConfigError, ValueError, OSError) as e:
            problems.append(str(e))
    return problems


class Prefetcher:
    """Reads the next step's slice of the global batch in a background thread while this
    step computes (into pinned memory on GPUs, so the copy to the device is asynchronous).

    The next position is known in advance: the consumed-sample count plus this step's
    batch, and the ramp-up's size there. A request for any other position (a resume, a
    test) is read on the spot, so the data a step trains on never depends on timing."""

    def __init__(self, dataset, rampup, dp_rank: int, dp: int, pin: bool, enabled: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self.dataset, self.rampup, self.dp_rank, self.dp, self.pin = dataset, rampup, dp_rank, dp, pin
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mtnlg-prefetch") if enabled else None
        self.pending = None  # (consumed, batch size, future)

    def _load(self, consumed: int, gbs: int):
        import torch

        t = torch.from_numpy(self.dataset.global_batch(consumed, gbs, self.dp_rank, self.dp))
        return t.pin_memory() if self.pin else t

    def get(self, consumed: int, gbs: int):
        """This rank's (b, T+1) int64 tokens of the global batch at ``consumed``."""
        if self.pending is not None and self.pending[:2] == (consumed, gbs):
            tokens = self.pending[2].result()
        else:
            tokens = self._load(consumed, gbs)
        if self.pool is not None:
            nxt = consumed + gbs
            size = self.rampup.batch_size(nxt)
            self.pending = (nxt, size, self.pool.submit(self._load, nxt, size))
        return tokens

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending = None
