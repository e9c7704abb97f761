"""Fuse a sharded training checkpoint into one model directory.

    fuse_checkpoint("runs/train", "runs/model", dtype="bf16", hf=True)

reads the checkpoint ``runs/train/checkpoints/latest`` names (or a checkpoint directory
given directly), written at any (tp, dp) layout, local, gs:// or s3://, and writes::

    runs/model/config.json          the ModelConfig (JSON)
    runs/model/model.safetensors    weights (model-0000i-of-0000n.safetensors + index when big)
    runs/model/tokenizer.model      the SentencePiece model, and tokenizer.json (its ids)
    runs/model/manifest.json        sha256 of every file, shape/dtype/sha256 of every tensor,
                                    source checkpoint, step, verification result
    runs/model/hf/                  with hf=True: a Hugging Face model directory (mtnlg.fuse.hf)

Tensors are streamed: each is assembled from its checkpoint chunks, cast, written and
dropped before the next is read, so memory peaks near the largest tensor, and the
optimizer state (two thirds of a checkpoint with Adam) is never read.

Vocabulary padding: a checkpoint trained at tensor-parallel degree tp has an embedding
padded to a multiple of ``make_vocab_size_divisible_by * tp``. The fused model keeps those
rows (their logits are part of the softmax the model was trained with) and records
``make_vocab_size_divisible_by * tp`` in config.json, so ``GPT(cfg)`` at tp=1 has exactly
the stored shape and computes exactly the trained function.

Verification (on by default for models up to 2B parameters): the checkpoint is loaded a
second, independent way, through the trainer's own DCP loader into a single-process fp32
model, and its logits on a fixed batch (2 x min(32, seq_length) tokens, seed 0) are
compared with those of the model read back from the written files (in fp32):

======  =================================================================================
dtype   tolerance on max |logit difference|
======  =================================================================================
fp32    1e-5 absolute: the weights are bit-identical, so in practice the difference is 0
bf16    5e-2 x max |logit|: bf16 keeps 8 bits of mantissa (relative error 2^-9 per weight)
fp16    1e-2 x max |logit|: fp16 keeps 11 bits (2^-12)
======  =================================================================================

The tensor-parallel model itself is compared with the fused one in the tests (the TP
forward differs from the single-process one only by reduction order, within 1e-5).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import torch

from mtnlg import storage
from mtnlg.config import from_dict
from mtnlg.formats.fused import expected_tensors, load_fused, numel, staged_output, write_model_dir
from mtnlg.formats.manifest import save_manifest
from mtnlg.formats.rundir import RUN_CONFIG, TOKENIZER_FILES, TOKENIZER_MODEL
from mtnlg.formats.sharded_safetensors import FUSE_DTYPES
from mtnlg.model.config import ModelConfig
from mtnlg.progress import get_logger

log = get_logger("mtnlg.fuse")

# dtype -> (absolute tolerance, tolerance relative to max |reference logit|)
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-5, 0.0), "bf16": (0.0, 5e-2), "fp16": (0.0, 1e-2)}
VERIFY_MAX_PARAMS = 2_000_000_000


def _dtype(name: str) -> torch.dtype:
    if name not in FUSE_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(FUSE_DTYPES)}")
    return FUSE_DTYPES[name]


def fixed_batch(cfg: ModelConfig) -> torch.Tensor:
    """The verification batch: (2, min(32, seq_length)) token ids from seed 0."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, min(32, cfg.seq_length)), generator=g)


def check_logits(ref: torch.Tensor, got: torch.Tensor, dtype: str, what: str) -> float:
    """Max |difference|; raises ValueError beyond the dtype's tolerance (TOLERANCES)."""
    atol, rtol = TOLERANCES[dtype]
    diff = float((ref.float() - got.float()).abs().max())
    limit = atol + rtol * float(ref.abs().max())
    if not diff <= limit:
        raise ValueError(f"{what}: logits differ by {diff:.4g}, more than the {dtype} tolerance {limit:.4g}")
    return diff


# --------------------------------------------------------------------------- checkpoint


def _checkpoint_model_config(ckpt: str, state: dict[str, Any]) -> tuple[ModelConfig, int]:
    """The trained ModelConfig and the tensor-parallel degree it was padded for."""
    import yaml

    model = state.get("model")
    cfg_path = storage.join(ckpt, RUN_CONFIG)
    run: dict[str, Any] = {}
    if storage.exists(cfg_path):
        run = yaml.safe_load(storage.read_text(cfg_path)) or {}
    if model is None:
        model = run.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{ckpt}: neither trainer_state.json nor config.yaml describes the model")
    tp = (state.get("layout") or {}).get("tp") or (run.get("parallel") or {}).get("tp") or 1
    return from_dict(ModelConfig, model, prefix="model"), int(tp)


def fused_config(cfg: ModelConfig, tp: int, embedding_rows: int) -> ModelConfig:
    """``cfg`` with the vocabulary padding the stored embedding has (see module doc)."""
    fused = dataclasses.replace(cfg, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp)
    if fused.padded_vocab_size(1) != embedding_rows:
        raise ValueError(f"the checkpoint's embedding has {embedding_rows} rows, but vocab_size="
                         f"{cfg.vocab_size} padded for tp={tp} gives {cfg.padded_vocab_size(tp)}")
    return fused


def _tokenizer_sources(ckpt: str, state: dict[str, Any]) -> dict[str, str]:
    """Tokenizer files: those saved in the checkpoint, else the tokenized data directory's."""
    found = {n: storage.join(ckpt, n) for n in TOKENIZER_FILES if storage.exists(storage.join(ckpt, n))}
    if TOKENIZER_MODEL in found:
        return found
    ref = state.get("tokenizer")
    if ref:
        data_dir = ref.rsplit("/", 1)[0] if ref.endswith(".model") else ref
        found = {n: storage.join(data_dir, n) for n in TOKENIZER_FILES if storage.exists(storage.join(data_dir, n))}
        if TOKENIZER_MODEL in found:
            return found
    raise FileNotFoundError(f"{ckpt}: no tokenizer.model in the checkpoint, nor at the tokenizer it "
                            f"references ({ref!r})")


def reference_logits(ckpt: str, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint loaded by the trainer's DCP loader (fp32, one process)."""
    from mtnlg.formats.checkpoint import load_checkpoint
    from mtnlg.model.gpt import GPT

    model = GPT(cfg)
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_checkpoint(ckpt, model, None)
    model.eval()
    with torch.no_grad():
        return model(tokens)


def check_output(output: str, hf: bool) -> None:
    """Fuse replaces only a fused model it wrote, whole: an existing ``output`` must be empty,
    missing, or a fused model directory (its ``manifest.json``) whose files are all the
    model's; a Hugging Face export in it (``hf/``) is replaced only by a fuse that writes one
    (``hf``). Anything else is refused, naming what would be lost, before anything is read."""
    from mtnlg.formats.rundir import HF_DIR, MANIFEST

    try:
        names = storage.file_sizes(output) if storage.exists(output) or storage.is_remote(output) else {}
    except (FileNotFoundError, NotADirectoryError):
        names = {}
    if not names:
        return
    if MANIFEST not in names:
        raise ValueError(f"{output} exists and is not a fused model directory ({len(names)} files, e.g. "
                         f"{sorted(names)[0]}): fuse writes a new directory and replaces only a model it wrote; "
                         "choose another --output")
    import json

    listed = set(json.loads(storage.read_text(storage.join(output, MANIFEST))).get("files") or {})
    kept = {MANIFEST} | listed
    export = sorted(n for n in names if n.startswith(HF_DIR + "/"))
    foreign = sorted(n for n in names if n not in kept and not n.startswith(HF_DIR + "/"))
    if foreign:
        raise ValueError(f"{output} holds files the fused model there does not list ({', '.join(foreign[:3])}"
                         f"{' ...' if len(foreign) > 3 else ''}): fuse would delete them; move them or choose "
                         "another --output")
    if export and not hf:
        raise ValueError(f"{output}/{HF_DIR} holds a Hugging Face export that this fuse would delete without "
                         f"writing a new one: pass --hf to rewrite it too (hf=true), or remove {output}/{HF_DIR}")


def fuse_checkpoint(checkpoint: str, output: str, dtype: str = "fp32", hf: bool = False,
                    max_shard_bytes: int = 2 << 30, verify: bool | None = None) -> dict[str, Any]:
    """Fuse ``checkpoint`` (a run dir, a checkpoints dir with ``latest``, or a checkpoint)
    into ``output``; returns a summary. ``verify=None`` verifies models up to 2B parameters."""
    from mtnlg.formats.checkpoint import resolve_checkpoint
    from mtnlg.formats.dcp_reader import MODEL_PREFIX, CheckpointReader
    from mtnlg.model.gpt import GPT

    _dtype(dtype)
    check_output(output, hf)
    t0 = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    with CheckpointReader(ckpt) as reader:
        state = reader.trainer_state
        cfg, tp = _checkpoint_model_config(ckpt, state)
        stored = reader.model_tensors()
        if "tok_embeddings.weight" not in stored:
            raise ValueError(f"{ckpt}: tensor 'model.tok_embeddings.weight' is missing from the checkpoint")
        cfg = fused_config(cfg, tp, stored["tok_embeddings.weight"].shape[0])
        with torch.device("meta"):
            expected = expected_tensors(GPT(cfg))
        for name, shape in expected.items():
            if name not in stored:
                raise ValueError(f"{ckpt}: tensor {MODEL_PREFIX + name!r} is missing from the checkpoint")
            if stored[name].shape != shape:
                raise ValueError(f"{ckpt}: tensor {MODEL_PREFIX + name!r} has shape {stored[name].shape}, "
                                 f"the model config needs {shape}")
        extra = [n for n in stored if n not in expected and not (n == "output.weight" and cfg.tie_embeddings)]
        if extra:
            raise ValueError(f"{ckpt}: unexpected tensor {MODEL_PREFIX + extra[0]!r} for this model config")
        names = list(expected)
        n_params = sum(numel(s) for s in expected.values())
        if verify is None:
            verify = n_params <= VERIFY_MAX_PARAMS
            if not verify:
                log.info("%d parameters: skipping logit verification (pass verify=True to force)", n_params)
        log.info("fusing %s (step %s, layout %s) -> %s as %s", ckpt, state.get("step"), state.get("layout"),
                 output, dtype)
        result: dict[str, Any] = {"checkpoint": ckpt, "step": state.get("step"), "dtype": dtype,
                                  "parameters": n_params, "tensors": len(names)}
        with staged_output(output) as out:
            manifest = write_model_dir(
                out, cfg, names, {n: stored[n].shape for n in names},
                lambda n: reader.read(MODEL_PREFIX + n), dtype, _tokenizer_sources(ckpt, state), max_shard_bytes,
                source=ckpt, step=state.get("step"), layout=state.get("layout"),
                trained_vocab_padding={"tp": tp, "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by // tp})
            reader.close()
            result["seconds"] = time.perf_counter() - t0
            result["bytes"] = int(manifest["weight_bytes"])
            result["mb_per_s"] = result["bytes"] / 1e6 / max(result["seconds"], 1e-9)
            result["files"] = len(manifest["files"])
            if verify:
                tokens = fixed_batch(cfg)
                ref = reference_logits(ckpt, cfg, tokens)
                model, _, _ = load_fused(out, dtype=torch.float32, decode_layout=False)
                with torch.no_grad():
                    got = model(tokens)
                result["max_abs_logit_diff"] = check_logits(ref, got, dtype, f"fused {out} vs checkpoint {ckpt}")
                log.info("verified: fused logits within %.3g of the checkpoint's (%s tolerance %s)",
                         result["max_abs_logit_diff"], dtype, TOLERANCES[dtype])
                manifest["verification"] = {"max_abs_logit_diff": result["max_abs_logit_diff"],
                                            "tolerance": TOLERANCES[dtype], "batch": list(tokens.shape)}
                save_manifest(out, manifest)
            if hf:
                from mtnlg.fuse.hf import export_hf

                result["hf"] = export_hf(out, os.path.join(out, "hf"), max_shard_bytes=max_shard_bytes)
        result["output"] = output
    log.info("fused %d tensors (%.1f MB) in %.1fs: %.1f MB/s", len(names), result["bytes"] / 1e6,
             result["seconds"], result["mb_per_s"])
    return result
