"""Rewrite a training checkpoint for another parallel layout, so training resumes there.

    reshard_checkpoint("runs/train", "runs/tp1/checkpoints", tp=1, pp=1)
    mtnlg train --nproc 1 --config runs/tp1/checkpoints/step_00000020/config.yaml output=runs/tp1

DCP checkpoints are already layout-independent on the way in: every process of the new
job reads the part of each tensor it owns, from whichever chunks overlap it. What ties a
checkpoint to a layout is everything around the tensors, and that is what resharding
rewrites:

* ``config.yaml``: ``parallel.tp`` / ``parallel.pp`` set to the new layout
  (``parallel.dp`` back to -1: it follows the world size at resume); the combination is
  checked with the trainer's own layout rules (``ParallelDims``) before anything is written;
* the vocabulary padding: the embedding (and an untied output head) has
  ``padded_vocab_size(tp)`` rows. The rows are kept whenever the new degree divides them,
  with ``model.make_vocab_size_divisible_by`` chosen so that the new padded size is the
  stored one: the original value if it already gives that size (so TP=2 -> TP=1 -> TP=2
  restores the original config), else ``rows / tp``. Only when the new degree does not
  divide the rows are zero rows appended (weights and Adam moments), with a warning;
* ``trainer_state.json``: the layout, the model config; step and consumed samples
  are kept, so the data stream and the LR schedule (a function of the step) continue exactly;
* the per-rank RNG states are dropped (they belong to the old ranks; the trainer says so
  when it resumes and reseeds);
* checksums (``checksums/``) of the shards and side files, as a training save writes them,
  with ``world_size`` 1 (one process writes every shard), so ``mtnlg verify`` and the
  resume check it like any other checkpoint;
* the optimizer's hyper-parameters between pp = 1 and pp > 1: a pp = 1 run saves AdamW's
  groups as lists (``optim.param_groups.0.params`` naming the parameters), a pipeline run
  per parameter (``optim.param_groups.<fqn>.lr``, each stage's optimizer holding other
  parameters), so they are regrouped; with tied embeddings a pipeline's last stage holds its
  own copy of the table and its Adam moments, written from the first stage's (pp = 1 keeps
  the one shared parameter).

Model and optimizer tensors are re-saved with DCP, one tensor at a time: the state dict
handed to ``dcp.save`` holds meta tensors (shape and dtype only), and the save planner
reads each real tensor from the source checkpoint when the writer asks for it. Every
tensor and plain entry of the source is carried over, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from mtnlg import storage
from mtnlg.formats.rundir import LATEST, RUN_CONFIG, TOKENIZER_META, TOKENIZER_MODEL, TRAINER_STATE
from mtnlg.progress import Progress, get_logger

log = get_logger("mtnlg.fuse.reshard")

# the parameters whose first dimension is the padded vocabulary
VOCAB_PARAMS = ("tok_embeddings.weight", "output.weight")


def _vocab_param(fqn: str) -> str | None:
    """The vocab-sized parameter an entry belongs to (weight or optimizer moment), or None."""
    for p in VOCAB_PARAMS:
        if fqn == "model." + p or fqn.startswith("optim.state." + p + "."):
            return p
    return None


def new_vocab_padding(vocab_size: int, rows: int, tp: int, candidates: list[int]) -> tuple[int, int]:
    """``(make_vocab_size_divisible_by, rows)`` for degree ``tp``, keeping ``rows`` if possible."""
    for m in candidates:
        if m >= 1 and -(-vocab_size // (m * tp)) * m * tp == rows:
            return m, rows
    if rows % tp == 0:
        return rows // tp, rows
    new_rows = -(-rows // tp) * tp
    return new_rows // tp, new_rows


_PG = "optim.param_groups."
_TIED_COPY = "output.weight"
_TIED_SOURCE = "tok_embeddings.weight"


def _is_grouped_key(fqn: str) -> bool:
    """``optim.param_groups.<group index>.<key>`` (pp = 1) rather than ``.<fqn>.<key>``."""
    return fqn.startswith(_PG) and fqn[len(_PG):].split(".", 1)[0].isdigit()


def regroup_optimizer(entries: dict, read_plain, to_flat: bool, decay_groups: tuple[list[str], list[str]],
                      tied: bool) -> tuple[set[str], dict[str, Any], dict[str, str]]:
    """What changes when the optimizer state moves between pp = 1 (grouped) and pp > 1 (per
    parameter): ``(removed entries, new plain entries, new tensor entries -> source entry)``.
    ``decay_groups`` are the target model's group names (``weight_decay_groups``)."""
    removed: set[str] = set()
    plain: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    if to_flat:
        groups: dict[str, dict[str, Any]] = {}
        for fqn in entries:
            if _is_grouped_key(fqn):
                g, key = fqn[len(_PG):].split(".", 1)
                groups.setdefault(g, {})[key] = read_plain(fqn)
                removed.add(fqn)
        for hp in groups.values():
            for name in hp.get("params") or []:
                for key, value in hp.items():
                    if key != "params":
                        plain[f"{_PG}{name}.{key}"] = value
        if tied and f"{_PG}{_TIED_SOURCE}.lr" in plain:
            for key, value in list(plain.items()):
                if key.startswith(f"{_PG}{_TIED_SOURCE}."):
                    plain[key.replace(_TIED_SOURCE, _TIED_COPY, 1)] = value
            prefix = f"optim.state.{_TIED_SOURCE}."
            for fqn in entries:
                if fqn.startswith(prefix):
                    aliases[f"optim.state.{_TIED_COPY}." + fqn[len(prefix):]] = fqn
        return removed, plain, aliases
    per_param: dict[str, dict[str, Any]] = {}
    for fqn in entries:
        if fqn.startswith(_PG) and not _is_grouped_key(fqn):
            name, key = fqn[len(_PG):].rsplit(".", 1)
            per_param.setdefault(name, {})[key] = read_plain(fqn)
            removed.add(fqn)
    if tied:  # one shared parameter at pp = 1: the last stage's copy goes
        removed |= {f for f in entries if f.startswith(f"optim.state.{_TIED_COPY}.")}
    index = 0
    for names in decay_groups:
        names = [n for n in names if n in per_param]
        if not names:
            continue
        for key, value in per_param[names[0]].items():
            plain[f"{_PG}{index}.{key}"] = value
        plain[f"{_PG}{index}.params"] = names
        index += 1
    return removed, plain, aliases


class _StreamingSavePlanner(DefaultSavePlanner):
    """Writes tensors the state dict only describes (meta tensors): each is read from the
    source checkpoint when the writer gets to it, so one tensor is in memory at a time.
    ``aliases`` maps new entries to the source entry they are written from."""

    def __init__(self, reader, rows: int, new_rows: int, prog: Progress, aliases: dict[str, str] | None = None):
        super().__init__()
        self.reader, self.rows, self.new_rows, self.prog = reader, rows, new_rows, prog
        self.aliases = aliases or {}

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        source = self.aliases.get(fqn, fqn)
        md = self.reader.metadata.state_dict_metadata.get(source)
        if not isinstance(md, TensorStorageMetadata):
            return super().resolve_data(write_item)
        t = self.reader.read(source)
        if _vocab_param(fqn) and t.dim() >= 1 and t.shape[0] == self.rows and self.new_rows != self.rows:
            pad = torch.zeros((self.new_rows - self.rows, *t.shape[1:]), dtype=t.dtype)
            t = torch.cat([t, pad], dim=0)                                        # (new_rows, ...)
        self.prog.update(1)
        return t


def reshard_checkpoint(checkpoint: str, output: str, tp: int, pp: int = 1) -> dict[str, Any]:
    """Write ``checkpoint`` for layout (tp, pp) as ``output/step_XXXXXXXX`` + ``output/latest``.

    ``checkpoint`` is a run dir, a checkpoints dir with ``latest``, or a checkpoint; both
    may be local, gs:// or s3://. Returns a summary with the overrides that resume from it.
    """
    import yaml

    from mtnlg.config import ConfigError, from_dict, to_dict
    from mtnlg.formats.checkpoint import FORMAT, resolve_checkpoint, step_dirname, write_checksums
    from mtnlg.formats.dcp_reader import CheckpointReader
    from mtnlg.model.config import ModelConfig
    from mtnlg.parallel.config import ParallelConfig
    from mtnlg.parallel.dims import ParallelDims

    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp and --pp must be >= 1, got tp={tp}, pp={pp}")
    src = resolve_checkpoint(checkpoint)
    with CheckpointReader(src) as reader:
        state = dict(reader.trainer_state)
        if state.get("format") != FORMAT:
            raise ValueError(f"{src}: unknown checkpoint format {state.get('format')!r} (expected {FORMAT})")
        cfg_path = storage.join(src, RUN_CONFIG)
        if not storage.exists(cfg_path):
            raise FileNotFoundError(f"{cfg_path} is missing: the checkpoint does not record its run config")
        run = yaml.safe_load(storage.read_text(cfg_path)) or {}
        model = from_dict(ModelConfig, run.get("model") or state.get("model") or {}, prefix="model")
        parallel = from_dict(ParallelConfig, dict(run.get("parallel") or {}, tp=tp, pp=pp, dp=-1), prefix="parallel")

        entries = reader.entries()
        emb = entries.get("model.tok_embeddings.weight")
        if not isinstance(emb, TensorStorageMetadata):
            raise ValueError(f"{src}: tensor 'model.tok_embeddings.weight' is missing from the checkpoint")
        rows = int(emb.size[0])
        old_tp = int((state.get("layout") or {}).get("tp") or (run.get("parallel") or {}).get("tp") or 1)
        original_m = int(state.get("original_make_vocab_size_divisible_by") or model.make_vocab_size_divisible_by)
        m, new_rows = new_vocab_padding(model.vocab_size, rows, tp, [original_m, model.make_vocab_size_divisible_by])
        if new_rows != rows:
            log.warning("padded vocabulary of %d rows does not divide by tp=%d: appending %d zero rows to the "
                        "embedding/output weights and their optimizer moments", rows, tp, new_rows - rows)
        new_model = dataclasses.replace(model, make_vocab_size_divisible_by=m)
        ParallelDims.build(parallel, tp * pp, new_model)  # the trainer's layout rules, before writing

        old_pp = int((state.get("layout") or {}).get("pp") or (run.get("parallel") or {}).get("pp") or 1)
        run = dict(run, model=to_dict(new_model), parallel=to_dict(parallel))
        removed, plain, aliases = set(), {}, {}
        if (old_pp > 1) != (pp > 1) and any(f.startswith(_PG) for f in entries):
            from mtnlg.model.gpt import GPT, weight_decay_groups

            with torch.device("meta"):
                groups = weight_decay_groups(GPT(new_model, tp=1))
            removed, plain, aliases = regroup_optimizer(entries, reader.read_bytes_entry, to_flat=pp > 1,
                                                        decay_groups=groups, tied=new_model.tie_embeddings)
        # a meta-tensor description of every tensor, and the small plain entries themselves
        sd: dict[str, Any] = {}
        n_tensors = 0
        tensors = [(f, md) for f, md in entries.items() if f not in removed]
        tensors += [(new, entries[src]) for new, src in aliases.items()]
        for fqn, md in tensors:
            if isinstance(md, TensorStorageMetadata):
                shape = list(md.size)
                if _vocab_param(fqn) and shape and shape[0] == rows:
                    shape[0] = new_rows
                sd[fqn] = torch.empty(shape, dtype=md.properties.dtype, device="meta")
                n_tensors += 1
            elif isinstance(md, BytesStorageMetadata):
                sd[fqn] = reader.read_bytes_entry(aliases.get(fqn, fqn))
        sd.update(plain)
        step = int(state.get("step", 0))
        new_state = dict(state, layout={"tp": tp, "pp": pp, "dp": None,
                                        "sequence_parallel": parallel.sequence_parallel, "fsdp": parallel.fsdp},
                         model=to_dict(new_model), world_size=1, rng="dropped by mtnlg reshard",
                         resharded_from=src,
                         original_make_vocab_size_divisible_by=original_m)
        name = step_dirname(step)
        with tempfile.TemporaryDirectory(prefix="mtnlg-reshard-") as tmp:
            local = os.path.join(tmp, name)
            prog = Progress("reshard", total=n_tensors, unit="tensors")
            with warnings.catch_warnings():  # one process writes every shard: intended
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(sd, storage_writer=FileSystemWriter(local, thread_count=1),
                         planner=_StreamingSavePlanner(reader, rows, new_rows, prog, aliases), no_dist=True)
            prog.close()
            with open(os.path.join(local, RUN_CONFIG), "w", encoding="utf-8") as f:
                yaml.safe_dump(run, f, sort_keys=False)
            side = [RUN_CONFIG]
            for tok in (TOKENIZER_MODEL, TOKENIZER_META):
                if storage.exists(storage.join(src, tok)):
                    storage.copy(storage.join(src, tok), os.path.join(local, tok))
                    side.append(tok)
            # checksums as a training save writes them: the one writer's shards, the side files
            write_checksums(local, sorted(n for n in os.listdir(local) if n.endswith(".distcp")) + [".metadata"], 0)
            write_checksums(local, side, 0, suffix="-side")
            target = storage.join(output, name)
            if storage.exists(target):
                storage.remove(target)
            storage.copy_tree(local, target)
            # last: the state file marks the checkpoint complete, then latest points at it
            storage.write_text(storage.join(target, TRAINER_STATE), json.dumps(new_state, indent=2, sort_keys=True))
            storage.write_text(storage.join(output, LATEST), name + "\n")
    overrides = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"checkpoint.load={target}"]
    if m != model.make_vocab_size_divisible_by:
        overrides.insert(2, f"model.make_vocab_size_divisible_by={m}")
    log.info("resharded %s (tp=%d, pp=%d) -> %s (tp=%d, pp=%d)", src, old_tp, old_pp, target, tp, pp)
    return {"checkpoint": target, "source": src, "step": step, "tp": tp, "pp": pp, "source_tp": old_tp,
            "tensors": n_tensors, "vocab_rows": new_rows, "make_vocab_size_divisible_by": m,
            "resume_overrides": overrides}
