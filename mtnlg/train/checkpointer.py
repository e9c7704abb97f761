"""When and what a run checkpoints, and where it resumes from.

The files themselves (DCP shards, RNG states, ``trainer_state.json``, ``latest``) are the
``mtnlg.formats.checkpoint`` format; this module decides the cadence
(``checkpoint.every``, always at the end), assembles the trainer state from the run's
``Stateful`` pieces (:class:`~mtnlg.train.state.TrainState`, the fp16 ``GradScaler``), and
restores them on resume (``checkpoint.load``: ``auto``, ``none`` or a path).
"""

from __future__ import annotations

from typing import Any

from mtnlg import storage
from mtnlg.config import dump_yaml, to_dict
from mtnlg.formats import checkpoint as ckpt
from mtnlg.formats.rundir import CHECKPOINTS_DIR, TOKENIZER_FILES, TOKENIZER_MODEL
from mtnlg.progress import get_logger
from mtnlg.train.state import TrainState

log = get_logger("mtnlg.train")


def tokenizer_files(data_path: str) -> dict[str, str]:
    """The tokenizer files of a tokenized directory, to copy into every checkpoint."""
    out = {}
    for name in TOKENIZER_FILES:
        p = storage.join(data_path, name)
        if storage.exists(p):
            out[name] = p
    return out


class Checkpointer:
    """Saves and restores the model, optimizer, RNG and :class:`TrainState`. Collective:
    every rank calls every method."""

    def __init__(self, cfg, model, optimizer, state: TrainState, scaler, flatten_optimizer: bool,
                 description: dict[str, Any], verbose: bool):
        self.cfg = cfg
        self.directory = storage.join(cfg.output, CHECKPOINTS_DIR)
        self.model, self.optimizer, self.state, self.scaler = model, optimizer, state, scaler
        self.flatten_optimizer = flatten_optimizer
        self.description = description  # layout and parameter count, for readers of the checkpoint
        self.verbose = verbose
        self.resumed_from: str | None = None
        self.last: str | None = None
        self.pending = None   # a checkpoint being written in the background
        self._group = None

    def _trainer_state(self) -> dict[str, Any]:
        seq = self.cfg.model.seq_length
        return {
            **self.state.state_dict(),
            "consumed_tokens": self.state.consumed_samples * seq,
            **self.description,
            "tokenizer": storage.join(self.cfg.data.path, TOKENIZER_MODEL),
            "model": to_dict(self.cfg.model),
            # fp16 loss scale (a float and a counter), so a resumed fp16 run scales alike
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save(self, background: bool = False) -> str:
        """Save the current state; with ``background`` (and ``checkpoint.async_save``) the
        state is copied to host memory now and written while training goes on, completed
        by :meth:`complete` (the next logging step, the next save or the end of the run)."""
        self.complete()
        group = self._async_group() if background and self.cfg.checkpoint.async_save else None
        pending = ckpt.PendingCheckpoint(self.directory, self.state.step, self.model, self.optimizer,
                                         self._trainer_state(), dump_yaml(self.cfg),
                                         tokenizer_files(self.cfg.data.path), self.cfg.checkpoint.keep_last,
                                         self.flatten_optimizer, process_group=group)
        if group is None:
            self.last = pending.finish()
        else:
            self.pending = pending
            if self.verbose:
                log.info("writing checkpoint %s in the background", pending.final)
        return pending.final

    def complete(self) -> str | None:
        """Finish a checkpoint still being written (collective); its path, or None."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        self.last = pending.finish()
        return self.last

    def _async_group(self):
        """The gloo group the background writer coordinates over (never the training's)."""
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def due(self, step: int, last_step: bool) -> bool:
        """Whether ``step`` is on the ``checkpoint.every`` cadence (the last step is saved by
        :meth:`finish`)."""
        every = self.cfg.checkpoint.every
        return bool(every and step % every == 0 and not last_step)

    def maybe_save(self, step: int, last_step: bool) -> bool:
        """Save on the ``checkpoint.every`` cadence."""
        if self.due(step, last_step):
            self.save(background=True)
            return True
        return False

    def finish(self, start_step: int, stopped: str) -> str | None:
        """The checkpoint that holds the run's end: saved now unless a resumed run did not
        move (then the one it resumed from)."""
        self.complete()
        if self.state.step > start_step or self.resumed_from is None or stopped == "signal":
            return self.save()
        return self.last or self.resumed_from

    def maybe_resume(self) -> None:
        spec = self.cfg.checkpoint.load.strip()
        if spec.lower() in ("none", ""):
            return
        if spec.lower() in ("auto", "latest"):
            # a damaged newest checkpoint is skipped, with a warning; so is one whose shard
            # hashes fail only while loading (remote checkpoints are checked by size first)
            tried: list[str] = []
            while True:
                path = ckpt.latest_good(self.directory, skip=tried)
                if path is None:
                    if tried:
                        raise ckpt.CheckpointDamaged(f"no intact checkpoint in {self.directory}: "
                                                     f"{', '.join(tried)} failed to load")
                    return
                try:
                    meta = ckpt.load_checkpoint(path, self.model, self.optimizer,
                                                flatten_optimizer=self.flatten_optimizer)
                    break
                except ckpt.CheckpointDamaged as e:
                    log.warning("%s; trying an older checkpoint", e)
                    tried.append(path)
        else:
            path = ckpt.resolve_checkpoint(spec)
            meta = ckpt.load_checkpoint(path, self.model, self.optimizer, flatten_optimizer=self.flatten_optimizer)
        self.state.load_state_dict(meta)
        if self.scaler is not None and meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])
        self.resumed_from = path
        if self.verbose:
            log.info("resumed from %s at step %d (%d samples consumed)", path, self.state.step,
                     self.state.consumed_samples)


# the model settings that fix a checkpoint's tensor shapes
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
                "position", "norm", "activation", "tie_embeddings", "bias")


def check_resume(cfg) -> str | None:
    """The checkpoint this run will resume from (``checkpoint.load``), checked against the
    run's model before any process starts; None when it starts fresh. A model setting that
    changes a tensor's shape, or a vocabulary padded to another size (a checkpoint written by
    ``mtnlg reshard`` for a new tensor-parallel degree records the padding that keeps its
    rows), is a ``ConfigError`` naming the override that matches the checkpoint, instead of
    a size mismatch in every rank after launch."""
    import json

    from mtnlg.config import ConfigError, from_dict
    from mtnlg.formats.rundir import TRAINER_STATE
    from mtnlg.model.config import ModelConfig

    from mtnlg.train.data import with_tokenizer_vocab

    spec = cfg.checkpoint.load.strip()
    if spec.lower() in ("none", ""):
        return None
    if cfg.data.path:
        cfg = with_tokenizer_vocab(cfg, verbose=False)  # the vocabulary the trainer will use
    if spec.lower() in ("auto", "latest"):
        if not cfg.output:
            return None
        path = ckpt.read_latest(storage.join(cfg.output, CHECKPOINTS_DIR))
        if path is None or not storage.exists(storage.join(path, TRAINER_STATE)):
            return None  # a damaged or missing newest checkpoint is dealt with at resume
    else:
        path = ckpt.resolve_checkpoint(spec)
    meta = json.loads(storage.read_text(storage.join(path, TRAINER_STATE)))
    if not isinstance(meta.get("model"), dict):
        return path
    saved = from_dict(ModelConfig, meta["model"], prefix="model")
    for name in SHAPE_FIELDS:
        ours, theirs = getattr(cfg.model, name), getattr(saved, name)
        if ours != theirs:
            raise ConfigError(f"model.{name}={ours} but the checkpoint {path} was trained with model.{name}={theirs}: "
                              f"set model.{name}={theirs} to resume from it, or checkpoint.load=none to start afresh")
    saved_tp = int((meta.get("layout") or {}).get("tp") or 1)
    rows, ours = saved.padded_vocab_size(saved_tp), cfg.model.padded_vocab_size(cfg.parallel.tp)
    if rows != ours:
        fix = ""
        if rows % cfg.parallel.tp == 0:
            fix = f": set model.make_vocab_size_divisible_by={rows // cfg.parallel.tp} to resume from it"
        raise ConfigError(f"the checkpoint {path} holds a vocabulary padded to {rows} rows "
                          f"(model.make_vocab_size_divisible_by={saved.make_vocab_size_divisible_by}, tp={saved_tp}), "
                          f"this run pads it to {ours} (make_vocab_size_divisible_by="
                          f"{cfg.model.make_vocab_size_divisible_by} x parallel.tp={cfg.parallel.tp}){fix}")
    return path
