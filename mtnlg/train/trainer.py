"""The per-process training loop: what every rank of ``torchrun`` or a PyTorchJob runs.

One call, :func:`train`, takes a validated :class:`TrainRunConfig` and

1. joins the process group (gloo on CPU, NCCL on GPU) from RANK/WORLD_SIZE/...;
2. builds the ``(dp, tp)`` mesh (``(pp, dp, tp)`` with pipeline parallelism), the GPT (same
   seed on every rank, so every layout starts from the same weights), shards it with
   ``parallelize_gpt`` (under pipeline parallelism first cut to this rank's stage, see
   ``mtnlg.parallel.pipeline_parallel``), and AdamW;
3. resumes from a checkpoint when there is one (``checkpoint.load=auto``): weights,
   optimizer, RNG states and the data position, so the continuation is bit-identical;
4. per step: reads this data-parallel rank's slice of the global batch at the current
   consumed-sample position, accumulates gradients over micro-batches, skips the update
   if the loss is NaN/inf (aborting after ``max_nan_steps`` in a row), clips, sets the
   scheduled LR, steps; logs, validates and checkpoints on schedule;
5. on SIGTERM (Kubernetes deleting the pod) finishes the current step, saves a checkpoint
   and returns normally;
6. rank 0 writes ``log.jsonl``, TensorBoard events, ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtnlg import storage
from mtnlg.config import ConfigError, dump_yaml, to_dict
from mtnlg.progress import get_logger
from mtnlg.formats import checkpoint as ckpt
from mtnlg.train.config import TrainRunConfig, with_overrides
from mtnlg.dist import ProcessEnv, all_reduce_sum, barrier, broadcast_object, init_process_group
from mtnlg.train.optim import build_optimizer
from mtnlg.train.schedule import BatchRampup, LRSchedule

log = get_logger("mtnlg.train")

# Dense bf16/fp16 tensor-core peaks (TFLOP/s per device) and TF32 for fp32 runs.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf for ``train.max_nan_steps`` steps in a row."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but no CUDA device is available")
    return name


def resolve_dtype(name: str, device_type: str) -> str:
    if name != "auto":
        return name
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def device_peak_tflops(device_type: str, dtype: str) -> float | None:
    """The device's dense peak for ``dtype``, or None when unknown (CPUs, other GPUs)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(dtype)
    return None


class _StopFlag:
    """Set by SIGTERM; read (and agreed on by all ranks) at the end of each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = None

    def install(self) -> None:
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum


def _scalar(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # a replicated DTensor under loss_parallel
    return full() if full is not None else t


def _read_tokenizer_info(data_path: str) -> dict[str, Any] | None:
    path = storage.join(data_path, "tokenizer.json")
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def _resolve_vocab(cfg: TrainRunConfig, verbose: bool) -> TrainRunConfig:
    """The model's vocabulary is the tokenizer's: take ``vocab_size`` from tokenizer.json."""
    info = _read_tokenizer_info(cfg.data.path)
    if info is None:
        if verbose:
            log.warning("%s has no tokenizer.json; using model.vocab_size=%d as is",
                        cfg.data.path, cfg.model.vocab_size)
        return cfg
    vocab = int(info["vocab_size"])
    if vocab != cfg.model.vocab_size:
        if verbose:
            log.info("model.vocab_size=%d (from %s/tokenizer.json; the config said %d)",
                     vocab, cfg.data.path, cfg.model.vocab_size)
        cfg = with_overrides(cfg, [f"model.vocab_size={vocab}"])
    return cfg


class _RunFiles:
    """Rank 0's run directory. Written in place when local; for gs:// written to a local
    directory and uploaded at every checkpoint and at the end."""

    def __init__(self, output: str):
        self.output = output
        self.remote = storage.is_gcs(output)
        self.local = tempfile.mkdtemp(prefix="mtnlg-run-") if self.remote else output
        os.makedirs(self.local, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.local, name)

    def final(self, name: str) -> str:
        return storage.join(self.output, name)

    def fetch(self, name: str) -> None:
        """Bring an existing remote file (the log of a run being resumed) into the local dir."""
        if self.remote and storage.exists(self.final(name)):
            storage.copy(self.final(name), self.path(name))

    def sync(self) -> None:
        if self.remote:
            storage.copy_tree(self.local, self.output)

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class Trainer:
    """One process's share of a run; build with a config, then :meth:`run`."""

    def __init__(self, cfg: TrainRunConfig, env: ProcessEnv, device_type: str):
        from mtnlg.model.flops import count_parameters, flops_per_token
        from mtnlg.model.gpt import GPT
        from mtnlg.parallel.parallelize import parallelize_gpt
        from mtnlg.parallel.utils import set_seed_for_rank

        self.env = env
        self.device_type = device_type
        self.device = torch.device(device_type, env.local_rank) if device_type == "cuda" else torch.device("cpu")
        self.cfg = cfg = _resolve_vocab(cfg, env.is_main)
        self.dims = cfg.check_layout(env.world_size)
        self.dtype = resolve_dtype(cfg.train.dtype, device_type)
        self.mesh = self.dims.build_mesh(device_type)
        self.dp_rank = self.dims.dp_rank(self.mesh)
        self.tp_rank = self.dims.tp_rank(self.mesh)
        self.pp_rank = self.dims.pp_rank(self.mesh)
        if self.dims.pp > 1 and self.dtype == "fp16":
            raise ConfigError("train.dtype=fp16 (loss scaling) is not supported with parallel.pp > 1; "
                              "use bf16 or fp32")
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Same seed on every rank: every layout starts from the one-device model's weights
        # (dropout that must differ across tensor-parallel ranks forks from it per rank).
        set_seed_for_rank(cfg.train.seed)
        with torch.device(self.device):
            model = GPT(cfg.model, tp=self.dims.tp)
        self.n_params = count_parameters(cfg.model, self.dims.tp)
        self.flops_per_token = flops_per_token(cfg.model, self.dims.tp)
        self.pipeline = None
        if self.dims.pp > 1:
            from mtnlg.parallel.pipeline_parallel import Pipeline

            self.pipeline = Pipeline(model, self.mesh, self.dims, cfg.parallel, self.device)
            self.model = self.pipeline.model  # this stage only, under global parameter names
            # dropout draws differ per stage (Megatron); weights were drawn above, alike
            set_seed_for_rank(cfg.train.seed, self.pp_rank)
        else:
            self.model = parallelize_gpt(model, self.mesh, cfg.parallel)
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.lr, o.betas, o.eps, o.weight_decay)
        self.lr_at = LRSchedule(o.lr, o.min_lr, cfg.schedule.warmup_steps, cfg.schedule.decay, cfg.decay_steps)
        t = cfg.train
        self.rampup = BatchRampup(t.global_batch_size, t.rampup.start, t.rampup.increment, t.rampup.samples)
        self.scaler = torch.amp.GradScaler(device_type) if self.dtype == "fp16" else None
        self.peak = device_peak_tflops(device_type, self.dtype)
        self.ckpt_dir = storage.join(cfg.output, "checkpoints")

        # progress, restored from a checkpoint
        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.resumed_from: str | None = None

    # ------------------------------------------------------------------ data

    def _data_files(self) -> tuple[list[str], list[float], str]:
        d = self.cfg.data
        if d.blend:
            prefixes = [b.prefix if (storage.is_gcs(b.prefix) or os.path.isabs(b.prefix)) else storage.join(d.path, b.prefix)
                        for b in d.blend]
            weights = [b.weight for b in d.blend]
        else:
            prefixes, weights = [storage.join(d.path, d.train_prefix)], [1.0]
        return prefixes, weights, storage.join(d.path, d.valid_prefix)

    def _open_datasets(self) -> None:
        """Training (optionally blended) and validation samples; gs:// data is fetched and
        cached locally by GPTDataset itself."""
        from mtnlg.train.gpt_dataset import BlendedDataset, GPTDataset

        train_prefixes, weights, valid_prefix = self._data_files()
        want_valid = self.cfg.train.eval_iters > 0
        for prefix in train_prefixes + ([valid_prefix] if want_valid else []):
            for ext in (".bin", ".idx"):
                if storage.exists(prefix + ext):
                    continue
                if prefix == valid_prefix and want_valid:
                    raise FileNotFoundError(f"validation data {prefix + ext} not found (set data.valid_prefix, "
                                            "or train.eval_iters=0 to skip validation)")
                raise FileNotFoundError(f"training data {prefix + ext} not found (data.path={self.cfg.data.path!r})")
        seq, seed = self.cfg.model.seq_length, self.cfg.data.seed
        trains = [GPTDataset(p, seq, seed) for p in train_prefixes]
        self.train_ds = trains[0] if len(trains) == 1 else BlendedDataset(trains, weights, seed)
        self.valid_ds = GPTDataset(valid_prefix, seq, seed) if want_valid else None

    def _tokenizer_files(self) -> dict[str, str]:
        out = {}
        for name in ("tokenizer.model", "tokenizer.json"):
            p = storage.join(self.cfg.data.path, name)
            if storage.exists(p):
                out[name] = p
        return out

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def _micro_batches(self, tokens: np.ndarray):
        """(b_local, T+1) int64 -> micro-batches of (inputs, targets), each (mb, T)."""
        mb = self.cfg.train.micro_batch_size
        for i in range(0, tokens.shape[0], mb):
            chunk = torch.from_numpy(tokens[i:i + mb]).to(self.device, non_blocking=True)
            yield chunk[:, :-1], chunk[:, 1:]

    def _forward_backward(self, tokens: np.ndarray) -> float:
        """Gradients of the mean loss over this rank's slice; returns that mean loss."""
        from mtnlg.parallel.loss import cross_entropy, loss_parallel_context
        from mtnlg.parallel.utils import set_requires_gradient_sync

        n_micro = tokens.shape[0] // self.cfg.train.micro_batch_size
        if self.pipeline is not None:
            return self._pipeline_step(tokens, n_micro, train=True)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for i, (x, y) in enumerate(self._micro_batches(tokens)):
            # Data-parallel gradient reduction only after the last micro-batch.
            set_requires_gradient_sync(self.model, i == n_micro - 1)
            with loss_parallel_context(self.dims.tp > 1):
                with self._autocast():
                    logits = self.model(x)                                       # (mb, T, V_padded)
                loss = cross_entropy(logits, y)                                  # mean over mb*T
                scaled = loss / n_micro
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            total += _scalar(loss.detach()).float()
        return float(total) / n_micro

    def _pipeline_step(self, tokens: np.ndarray, n_micro: int, train: bool) -> float:
        """The schedule runs every micro-batch (forward, and backward when ``train``);
        the mean loss on the last stage, 0.0 on the others (see ``_stage_mean``)."""
        chunk = torch.from_numpy(tokens).to(self.device, non_blocking=True)
        x, y = chunk[:, :-1], chunk[:, 1:]                                       # (b_local, T)
        with self._autocast():
            run = self.pipeline.forward_backward if train else self.pipeline.evaluate
            loss = run(x, y, n_micro)
        return 0.0 if loss is None else loss

    def _stage_mean(self, loss_sum: float) -> float:
        """A world all-reduce sum of per-rank losses -> their mean: only the last pipeline
        stage's ranks (world / pp of them) contribute, the others add 0."""
        return loss_sum / (self.env.world_size // self.dims.pp)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_iters`` fixed global batches (the first ones)."""
        from mtnlg.parallel.loss import cross_entropy, loss_parallel_context

        self.model.eval()
        gbs = self.cfg.train.global_batch_size
        total, n = 0.0, 0
        for it in range(self.cfg.train.eval_iters):
            tokens = self.valid_ds.global_batch(it * gbs, gbs, self.dp_rank, self.dims.dp)
            if self.pipeline is not None:
                total += self._pipeline_step(tokens, tokens.shape[0] // self.cfg.train.micro_batch_size,
                                             train=False)
                n += 1
                continue
            for x, y in self._micro_batches(tokens):
                with loss_parallel_context(self.dims.tp > 1), self._autocast():
                    loss = _scalar(cross_entropy(self.model(x), y))
                total += float(loss)
                n += 1
        self.model.train()
        # Every rank of a tp group holds the same value; average over the whole world.
        (s,) = all_reduce_sum([total / max(n, 1)], self.device)
        return self._stage_mean(s)

    def _set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train_step(self, stop_requested: bool) -> dict[str, Any]:
        """One optimizer step (or a skipped one). Returns what happened, agreed by all ranks."""
        from mtnlg.parallel.utils import clip_grad_norm_

        gbs = self.rampup.batch_size(self.consumed_samples)
        tokens = self.train_ds.global_batch(self.consumed_samples, gbs, self.dp_rank, self.dims.dp)
        local_loss = self._forward_backward(tokens)
        # One collective for the loss (mean over dp: tp ranks agree) and the stop request.
        loss_sum, stops = all_reduce_sum([local_loss, 1.0 if stop_requested else 0.0], self.device)
        loss = self._stage_mean(loss_sum)
        finite = math.isfinite(loss)
        self.step += 1
        self.consumed_samples += gbs
        lr = self.lr_at(self.step)
        grad_norm = float("nan")
        if finite:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            # grad_clip 0 only measures the norm.
            grad_norm = clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip,
                                        pp_group=self.mesh.get_group("pp") if self.dims.pp > 1 else None)
            self._set_lr(lr)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips itself on inf/NaN gradients
                self.scaler.update()
            elif math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                finite = False  # finite loss, non-finite gradients: skip the update too
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "finite": finite, "lr": lr, "grad_norm": grad_norm, "batch_size": gbs,
                "stop": stops > 0}

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_samples * self.cfg.model.seq_length,
            "skipped_steps": self.skipped_steps,
            "scheduler": {"step": self.step, "lr": self.lr_at(max(self.step, 1))},
            "layout": {"tp": self.dims.tp, "dp": self.dims.dp, "pp": self.dims.pp,
                       "sequence_parallel": self.dims.sequence_parallel, "fsdp": self.dims.fsdp},
            "tokenizer": storage.join(self.cfg.data.path, "tokenizer.model"),
            "model": to_dict(self.cfg.model),
            "parameters": self.n_params,
            # fp16 loss scale (a float and a counter), so a resumed fp16 run scales alike
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save(self) -> str:
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self._trainer_state(),
                                    config_text=dump_yaml(self.cfg), extra_files=self._tokenizer_files(),
                                    keep_last=self.cfg.checkpoint.keep_last,
                                    flatten_optimizer=self.dims.pp > 1)

    def maybe_resume(self) -> None:
        spec = self.cfg.checkpoint.load.strip()
        if spec.lower() in ("none", ""):
            return
        if spec.lower() == "auto":
            path = ckpt.read_latest(self.ckpt_dir)
            if path is None:
                return
        else:
            path = ckpt.resolve_checkpoint(spec)
        meta = ckpt.load_checkpoint(path, self.model, self.optimizer, flatten_optimizer=self.dims.pp > 1)
        self.step = int(meta["step"])
        self.consumed_samples = int(meta["consumed_samples"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        if self.scaler is not None and meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.resumed_from = path
        if self.env.is_main:
            log.info("resumed from %s at step %d (%d samples consumed)", path, self.step, self.consumed_samples)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        stop = _StopFlag()
        stop.install()
        try:
            self._open_datasets()
            self.maybe_resume()
            return self._loop(stop)
        finally:
            stop.restore()

    def _loop(self, stop: _StopFlag) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        main = self.env.is_main
        files = _RunFiles(cfg.output) if main else None
        writer = None
        log_rows: list[dict] = []
        if main:
            log_rows = self._start_log(files)
            storage.write_text(files.path("config.yaml"), dump_yaml(cfg))
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(files.path("tensorboard"), purge_step=self.step + 1 if self.step else None)
            log.info("training %s parameters, %s, %s on %s: steps %d -> %d", f"{self.n_params:,}",
                     self.dims.describe(), self.dtype, self.device_type, self.step, t.steps)
        start_step = self.step
        self._start_samples = self.consumed_samples
        start_time = time.perf_counter()
        interval = {"t0": start_time, "tokens": 0, "losses": [], "steps": 0}
        nan_run = 0
        last_finite: tuple[int, float] | None = None
        last_ckpt: str | None = None
        stop_reason = "completed"
        val_loss = None
        try:
            while self.step < t.steps:
                r = self.train_step(stop.signum is not None)
                tokens = r["batch_size"] * cfg.model.seq_length
                interval["tokens"] += tokens
                interval["steps"] += 1
                if r["finite"]:
                    nan_run = 0
                    last_finite = (self.step, r["loss"])
                    interval["losses"].append(r["loss"])
                else:
                    nan_run += 1
                    self.skipped_steps += 1
                    if main:
                        log.warning("step %d: loss %s, grad norm %s: update skipped (%d in a row)",
                                    self.step, r["loss"], r["grad_norm"], nan_run)
                    if nan_run >= t.max_nan_steps:
                        where = (f"last finite loss {last_finite[1]:.4f} at step {last_finite[0]}"
                                 if last_finite else "no finite loss yet")
                        raise TrainingDiverged(
                            f"loss was NaN/inf for {nan_run} steps in a row (steps {self.step - nan_run + 1}-"
                            f"{self.step}, train.max_nan_steps={t.max_nan_steps}); {where}. Lower optim.lr, "
                            "check the data, or resume from an earlier checkpoint.")
                is_last = self.step >= t.steps
                eval_now = t.eval_iters > 0 and self.valid_ds is not None and (
                    is_last or (t.eval_every and self.step % t.eval_every == 0))
                val = self.evaluate() if eval_now else None
                if val is not None:
                    val_loss = val
                if main and (self.step % t.log_every == 0 or self.step == start_step + 1 or is_last
                             or val is not None or r["stop"]):
                    row = self._log_row(r, interval, start_step, start_time, val)
                    log_rows.append(row)
                    self._write_row(files, writer, row)
                    interval = {"t0": time.perf_counter(), "tokens": 0, "losses": [], "steps": 0}
                if r["stop"]:
                    stop_reason = "signal"
                    break
                if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) and not is_last:
                    last_ckpt = self.save()
                    if main:
                        files.sync()
            if self.step > start_step or self.resumed_from is None or stop_reason == "signal":
                last_ckpt = self.save()
            elif last_ckpt is None:
                last_ckpt = self.resumed_from
        except TrainingDiverged as e:
            if main:
                self._finish(files, writer, log_rows, start_step, start_time, None, "diverged", val_loss, str(e))
            barrier()  # no rank exits (and gets the others killed) before the summary is written
            raise
        summary = None
        if main:
            summary = self._finish(files, writer, log_rows, start_step, start_time, last_ckpt, stop_reason, val_loss)
            log.info("%s at step %d: final loss %s, checkpoint %s", stop_reason, self.step,
                     summary.get("final_loss"), last_ckpt)
        return broadcast_object(summary)

    # ------------------------------------------------------------------ logging

    def _start_log(self, files: _RunFiles) -> list[dict]:
        """Rows of an earlier log up to the resumed step (later rows belong to a lost future)."""
        if not self.step:
            storage.write_text(files.path("log.jsonl"), "")
            return []
        files.fetch("log.jsonl")
        rows = []
        path = files.path("log.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        if row.get("step", 0) <= self.step:
                            rows.append(row)
        storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def _log_row(self, r: dict, interval: dict, start_step: int, start_time: float, val: float | None) -> dict:
        now = time.perf_counter()
        dt = max(now - interval["t0"], 1e-9)
        tps = interval["tokens"] / dt
        tflops = tps * self.flops_per_token / 1e12
        losses = interval["losses"]
        done = self.step - start_step
        eta = (now - start_time) / done * (self.cfg.train.steps - self.step) if done else None
        row = {
            "step": self.step,
            "loss": sum(losses) / len(losses) if losses else None,
            "lr": r["lr"],
            "grad_norm": r["grad_norm"] if math.isfinite(r["grad_norm"]) else None,
            "tokens_per_s": tps,
            "tflops": tflops,
            "mfu": tflops / (self.peak * self.env.world_size) if self.peak else None,
            "batch_size": r["batch_size"],
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_samples * self.cfg.model.seq_length,
            "skipped_steps": self.skipped_steps,
            "step_time_s": dt / max(interval["steps"], 1),
            "elapsed_s": now - start_time,
            "eta_s": eta,
        }
        if val is not None:
            row["val_loss"] = val
        return row

    def _write_row(self, files: _RunFiles, writer, row: dict) -> None:
        with open(files.path("log.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "batch_size", "val_loss"):
            if row.get(key) is not None:
                writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", row[key], row["step"])
        t = self.cfg.train
        eta = row["eta_s"]
        parts = [f"step {row['step']}/{t.steps} ({100.0 * row['step'] / t.steps:.0f}%)",
                 f"loss {row['loss']:.4f}" if row["loss"] is not None else "loss nan",
                 f"lr {row['lr']:.3g}",
                 f"grad norm {row['grad_norm']:.3f}" if row["grad_norm"] is not None else "grad norm nan",
                 f"{row['tokens_per_s']:,.0f} tok/s", f"{row['tflops']:.3f} TFLOP/s"]
        if row["mfu"] is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if "val_loss" in row:
            parts.append(f"val loss {row['val_loss']:.4f}")
        parts.append(f"ETA {_fmt_s(eta)}" if eta is not None else "ETA ?")
        log.info(" | ".join(parts))

    def _finish(self, files: _RunFiles, writer, rows: list[dict], start_step: int, start_time: float,
                checkpoint: str | None, stopped: str, val_loss: float | None, error: str | None = None) -> dict:
        wall = time.perf_counter() - start_time
        steps_run = self.step - start_step
        tokens_run = (self.consumed_samples - self._start_samples) * self.cfg.model.seq_length
        tps = tokens_run / wall if wall > 0 else 0.0
        tflops = tps * self.flops_per_token / 1e12
        losses = [r["loss"] for r in rows if r.get("loss") is not None]
        summary = {
            "steps": self.step,
            "steps_this_run": steps_run,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "val_loss": val_loss,
            "checkpoint": checkpoint,
            "log": files.final("log.jsonl"),
            "tensorboard": files.final("tensorboard"),
            "loss_curve": files.final("loss.png"),
            "config": files.final("config.yaml"),
            "output": self.cfg.output,
            "stopped": stopped,
            "error": error,
            "resumed_from": self.resumed_from,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_samples * self.cfg.model.seq_length,
            "skipped_steps": self.skipped_steps,
            "parameters": self.n_params,
            "flops_per_token": self.flops_per_token,
            "tokens_per_s": tps,
            "tflops": tflops,
            "mfu": tflops / (self.peak * self.env.world_size) if self.peak else None,
            "wall_s": wall,
            "world_size": self.env.world_size,
            "layout": {"tp": self.dims.tp, "dp": self.dims.dp, "pp": self.dims.pp,
                       "sequence_parallel": self.dims.sequence_parallel, "fsdp": self.dims.fsdp},
            "device": self.device_type,
            "dtype": self.dtype,
        }
        writer.flush()
        writer.close()
        try:
            plot_loss_curve(rows, files.path("loss.png"))
        except Exception as e:  # noqa: BLE001 - a missing plot must not fail a finished run
            log.warning("could not draw loss.png: %s", e)
        storage.write_text(files.path("summary.json"), json.dumps(summary, indent=2))
        files.sync()
        files.close()
        return summary


def _fmt_s(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def plot_loss_curve(rows: list[dict], path: str) -> None:
    """Training (and validation) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    if pts:
        ax.plot(*zip(*pts), label="train loss")
    vals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if vals:
        ax.plot(*zip(*vals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(cfg: TrainRunConfig) -> dict[str, Any]:
    """Run this process's part of the training; returns the summary (on every rank)."""
    device_type = resolve_device(cfg.train.device)
    owns_group = not dist.is_initialized()
    env = init_process_group(device_type)
    ok = False
    try:
        summary = Trainer(cfg, env, device_type).run()
        ok = True
        return summary
    finally:
        if owns_group and dist.is_initialized():
            if ok:
                # Leave together: a rank tearing gloo down while its peer is still inside a
                # collective can abort the peer ("terminate called without an active exception").
                dist.barrier()
            dist.destroy_process_group()
