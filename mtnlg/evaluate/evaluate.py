"""Evaluate a fused model on a tokenized directory's validation split, and write a report.

    evaluate_model("runs/model", "runs/tokens", "runs/eval", train_log="runs/train/log.jsonl",
                   config=EvaluateConfig(max_cloze_items=200))

measures

* validation loss and perplexity over the whole validation split (``metrics.stream_loss``);
* last-word accuracy on LAMBADA-style cloze items cut from the validation documents
  (``cloze.make_cloze_items``, ``metrics.cloze_accuracy``);
* greedy sample generations for a few fixed prompts,

and writes ``metrics.json``, ``report.md``, ``report.html`` (and ``loss.png`` from the
training log) into ``output`` (local, gs:// or s3://).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import torch

from mtnlg import storage
from mtnlg.evaluate.config import EvaluateConfig
from mtnlg.formats.rundir import HF_DIR, LM_EVAL_DIR, TOKENIZER_META
from mtnlg.progress import get_logger

log = get_logger("mtnlg.evaluate")

MIN_CLOZE_SEQ_LENGTH = 17  # eod + 8 context tokens + a word of up to 8 tokens


def _open_split(data_dir: str, split: str, tmp: str):
    """The split's IndexedDataset, downloading ``.bin``/``.idx`` side by side for gs:// and s3://."""
    from mtnlg.formats.indexed_dataset import IndexedDataset

    prefix = storage.join(data_dir, split)
    for ext in (".bin", ".idx"):
        if not storage.exists(prefix + ext):
            raise FileNotFoundError(f"{prefix + ext} does not exist: {data_dir} has no {split!r} split "
                                    "(expected the output of `mtnlg tokenize`)")
    if storage.is_remote(prefix):
        local = os.path.join(tmp, split)
        for ext in (".bin", ".idx"):
            storage.copy(prefix + ext, local + ext)
        prefix = local
    return IndexedDataset(prefix)


def _check_same_tokenizer(data_dir: str, tokenizer) -> None:
    """Evaluating on ids from another tokenizer would measure nothing: refuse it."""
    meta_path = storage.join(data_dir, TOKENIZER_META)
    if not storage.exists(meta_path):
        return
    theirs = json.loads(storage.read_text(meta_path)).get("sha256")
    ours = tokenizer.metadata()["sha256"]
    if theirs and theirs != ours:
        raise ValueError(f"{data_dir} was tokenized with a different tokenizer (sha256 {theirs[:12]}...) "
                         f"than the model's ({ours[:12]}...)")


def _lm_eval(items, tok, model_dir: str, data_dir: str, output: str, c: EvaluateConfig) -> dict[str, Any]:
    """Write the cloze items as an lm-evaluation-harness task under OUTPUT/lm_eval and, with
    ``run_lm_eval``, run the harness on MODEL/hf with it."""
    from mtnlg.evaluate.harness import TASK_NAME, run_lm_eval, write_lm_eval_task

    out: dict[str, Any] = {"lm_eval_task": storage.join(output, LM_EVAL_DIR, f"{TASK_NAME}.yaml")}
    with storage.local_dir_for_output(storage.join(output, LM_EVAL_DIR)) as d:
        write_lm_eval_task(items, tok, d, data=data_dir, relative=storage.is_remote(output))
    if not c.run_lm_eval:
        return out
    with tempfile.TemporaryDirectory(prefix="mtnlg-lm-eval-") as task_dir, \
            storage.local_copy(storage.join(model_dir, HF_DIR)) as hf_dir:
        write_lm_eval_task(items, tok, task_dir, data=data_dir)
        t0 = time.perf_counter()
        res = run_lm_eval(hf_dir, task_dir, batch_size=c.batch_size, device=c.device)
    from mtnlg.evaluate.metrics import wilson_interval

    out.update(lm_eval_cloze_accuracy=res["accuracy"], lm_eval_cloze_items=res["items"],
               lm_eval_cloze_accuracy_ci95=list(wilson_interval(round(res["accuracy"] * res["items"]), res["items"])),
               lm_eval_cloze_perplexity=res["perplexity"], lm_eval_version=res["version"])
    log.info("lm-evaluation-harness %s: last-word accuracy %.4f on %d items (%.1fs)", res["version"],
             res["accuracy"], res["items"], time.perf_counter() - t0)
    return out


def evaluate_model(model_dir: str, data_dir: str, output: str, train_log: str | None = None,
                   config: EvaluateConfig | None = None) -> dict[str, Any]:
    """Evaluate the fused model in ``model_dir`` on ``data_dir``'s validation split (with
    the training run's ``train_log`` for the loss curve); returns the metrics (also in
    metrics.json)."""
    c = config or EvaluateConfig()
    batch_size, max_cloze_items, max_eval_tokens = c.batch_size, c.max_cloze_items, c.max_eval_tokens
    from mtnlg.evaluate.cloze import make_cloze_items
    from mtnlg.evaluate.metrics import cloze_accuracy, stream_loss
    from mtnlg.evaluate.report import train_log_metrics, write_report
    from mtnlg.formats.fused import load_fused
    from mtnlg.formats.runlog import loss_rows, read_log
    from mtnlg.model.decode import generate

    t0 = time.perf_counter()
    model, cfg, tok = load_fused(model_dir, device=c.device)
    _check_same_tokenizer(data_dir, tok)
    metrics: dict[str, Any] = {"model": str(model_dir), "data": str(data_dir),
                               "parameters": sum(p.numel() for p in model.parameters())}
    with tempfile.TemporaryDirectory(prefix="mtnlg-eval-") as tmp:
        ds = _open_split(data_dir, "validation", tmp)
        if ds.num_tokens == 0:
            raise ValueError(f"{data_dir}: the validation split is empty")
        import numpy as np

        stream = np.concatenate([np.array([tok.eod_id], dtype=np.int64),
                                 np.asarray(ds.tokens[:max_eval_tokens] if max_eval_tokens else ds.tokens,
                                            dtype=np.int64)])
        res = stream_loss(model, stream, cfg.seq_length, batch_size)
        # bits per UTF-8 byte of the text predicted: unlike perplexity, comparable across
        # tokenizers (a smaller vocabulary makes more, easier tokens of the same text)
        text_bytes = len(tok.decode(stream[1:]).encode("utf-8"))
        metrics.update(val_loss=res.loss, val_perplexity=res.perplexity, val_tokens=res.tokens,
                       val_windows=res.windows, val_documents=len(ds), val_loss_ci95=list(res.loss_ci95),
                       val_perplexity_ci95=list(res.perplexity_ci95), val_bytes=text_bytes,
                       val_bits_per_byte=res.loss * res.tokens / math.log(2) / max(text_bytes, 1))
        log.info("validation: loss %.4f, perplexity %.2f over %d tokens (%.3f bits per byte)", res.loss,
                 res.perplexity, res.tokens, metrics["val_bits_per_byte"])

        if max_cloze_items > 0 and cfg.seq_length >= MIN_CLOZE_SEQ_LENGTH:
            items, stats = make_cloze_items(ds, tok, cfg.seq_length, max_items=max_cloze_items)
            metrics["cloze_documents"] = stats.documents
            metrics["cloze_passages"] = stats.passages
            metrics["cloze_skipped"] = dict(stats.skipped)
            metrics.update(cloze_accuracy(model, items, batch_size))
            log.info("last-word accuracy: %s on %d items (%d passages of %d documents read, skipped %s)",
                     f"{metrics['cloze_accuracy']:.3f}" if items else "n/a", len(items), stats.passages,
                     stats.documents, stats.skipped)
            if c.lm_eval_task and items:
                metrics.update(_lm_eval(items, tok, model_dir, data_dir, output, c))
        else:
            log.warning("last-word accuracy skipped (max_cloze_items=%d, seq_length=%d; needs >= %d)",
                        max_cloze_items, cfg.seq_length, MIN_CLOZE_SEQ_LENGTH)
        del ds

    samples = []
    sc = c.sampling()
    for i, p in enumerate(c.prompts):  # sample i draws with seed + i: the same draws for every prompt would echo
        with torch.no_grad():
            samples.append({"prompt": p, "completion": generate(
                model, tok, p, max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_p=sc.top_p,
                seed=sc.seed + i, min_new_tokens=sc.min_new_tokens, repetition_penalty=sc.repetition_penalty)})
    metrics["samples_decoding"] = c.describe_sampling()
    records: list[dict] = []
    if train_log:
        rows, skipped = read_log(train_log)
        records = loss_rows(rows)
        skipped += len(rows) - len(records)  # a step whose loss was not finite
        metrics.update(train_log_metrics(records, skipped))
    metrics["seconds"] = time.perf_counter() - t0
    paths = write_report(output, metrics, samples, records)
    log.info("evaluation report: %s", paths["html"])
    return {**metrics, "samples": samples, "files": paths}
