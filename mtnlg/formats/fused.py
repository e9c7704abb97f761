"""Fused model directories: ``load_fused(dir) -> (GPT, ModelConfig, Tokenizer)``,
``save_fused(model, dir, tokenizer)`` and the streaming ``write_model_dir`` that
``mtnlg fuse`` writes through.

A fused directory (written by ``mtnlg fuse``) holds ``config.json`` (the ``ModelConfig``),
``model.safetensors`` (or shards + ``model.safetensors.index.json``), ``tokenizer.model`` +
``tokenizer.json`` and ``manifest.json``. Loading checks every file's sha256 against the
manifest first (``verify=False`` skips it), then builds the model without initialising it
(on the meta device) and fills it tensor by tensor, so peak memory is the model plus one
tensor. Every tensor the model expects must be present with its exact shape; an error
names the file and the tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Callable, Iterator

import torch

from mtnlg import storage
from mtnlg.config import from_dict, to_dict
from mtnlg.formats.manifest import hash_files, read_manifest, verify_files, write_manifest
from mtnlg.formats.rundir import MODEL_CONFIG, SINGLE_WEIGHTS, TOKENIZER_META, TOKENIZER_MODEL, WEIGHTS_INDEX
from mtnlg.formats.sharded_safetensors import FUSE_DTYPES, NAME_DTYPES, ShardedSafetensorsWriter, TensorSpec
from mtnlg.model.config import ModelConfig
from mtnlg.progress import Progress, get_logger

log = get_logger("mtnlg.formats.fused")


def read_model_config(directory: str) -> ModelConfig:
    path = storage.join(directory, MODEL_CONFIG)
    if not storage.exists(path):
        from mtnlg.formats.manifest import not_a_fused_model

        raise not_a_fused_model(directory, path)
    try:
        data = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "model_type" in data and "architectures" in data:
        parent = os.path.dirname(directory.rstrip("/"))
        raise ValueError(f"{directory} is a Hugging Face export (config.json of model_type "
                         f"{data['model_type']!r}), not a fused model: give its fused model directory "
                         f"({parent or '.'}), or load the export with transformers")
    return from_dict(ModelConfig, data, prefix="model")


def weight_files(directory: str) -> dict[str, str]:
    """``{tensor name: file name}`` from the index, or from the single file's header."""
    from mtnlg.formats.sharded_safetensors import read_header

    index = os.path.join(directory, WEIGHTS_INDEX)
    if os.path.exists(index):
        from mtnlg.formats.manifest import safe_relative

        with open(index, encoding="utf-8") as f:
            weight_map = dict(json.load(f)["weight_map"])
        return {k: safe_relative(v, index) for k, v in weight_map.items()}
    single = os.path.join(directory, SINGLE_WEIGHTS)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{directory} holds neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX}")
    header, _ = read_header(single)
    return {k: SINGLE_WEIGHTS for k in header if k != "__metadata__"}


def build_empty_model(cfg: ModelConfig, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ``GPT`` with allocated but unset parameters (position buffers are computed)."""
    from mtnlg.model.gpt import GPT, rope_table, sinusoidal_table

    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device=device)
    model.to(dtype)
    if cfg.tie_embeddings:  # to_empty gives every module its own tensor: tie them again
        model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        if model.pos_table is not None:
            model.pos_table = sinusoidal_table(cfg.seq_length, cfg.hidden_size).to(device)
        if model.rope is not None:
            model.rope = rope_table(cfg.seq_length, cfg.head_dim, cfg.rope_theta).to(device)
    return model


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes a fused file holds for ``model``: its state dict, with the
    output projection left out when it is the embedding (tied weights are stored once)."""
    sd = model.state_dict(keep_vars=True)
    out = {k: tuple(v.shape) for k, v in sd.items()}
    if getattr(model.cfg, "tie_embeddings", False):
        out.pop("output.weight", None)
    return out


def load_weights(model: torch.nn.Module, directory: str) -> None:
    """Copy every tensor of the fused files in local ``directory`` into ``model``."""
    from safetensors import safe_open

    files = weight_files(directory)
    expected = expected_tensors(model)
    missing = [k for k in expected if k not in files]
    if missing:
        raise ValueError(f"{directory}: tensor {missing[0]!r} is missing from the weights files "
                         f"({len(missing)} missing)")
    extra = [k for k in files if k not in expected]
    if extra:
        raise ValueError(f"{os.path.join(directory, files[extra[0]])}: unexpected tensor {extra[0]!r} "
                         f"for this model config ({len(extra)} unexpected)")
    params = model.state_dict(keep_vars=True)
    by_file: dict[str, list[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    with torch.no_grad():
        for fname, names in by_file.items():
            path = os.path.join(directory, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing (holds tensor {names[0]!r})")
            with safe_open(path, framework="pt") as f:
                for k in names:
                    sl = f.get_slice(k)
                    shape = tuple(sl.get_shape())
                    if shape != expected[k]:
                        raise ValueError(f"{path}: tensor {k!r} has shape {shape}, the model config "
                                         f"needs {expected[k]}")
                    params[k].copy_(f.get_tensor(k))


def column_major_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Store every linear layer's weight column-major, in place; values, shapes and names
    are unchanged (each weight becomes the transposed view of a contiguous (in, out)
    tensor, shared weights stay shared).

    Why: generating a token multiplies one row of activations by every weight matrix,
    streamed from main memory; CPU BLAS streams ``x @ W`` with W laid out (in, out) about
    1.4x faster than ``x @ W.T`` with W (out, in) (measured on this project's machines), and
    that is the layout ``F.linear`` then receives. Batched matmuls are indifferent to it.
    """
    with torch.no_grad():
        new: dict[int, torch.nn.Parameter] = {}
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and id(mod.weight) not in new:
                w = mod.weight
                new[id(w)] = torch.nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
        for mod in model.modules():  # re-point every holder (a tied embedding included)
            for name, p in list(mod.named_parameters(recurse=False)):
                if id(p) in new:
                    setattr(mod, name, new[id(p)])
    return model


def load_fused(directory: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               verify: bool = True, decode_layout: bool = True):
    """``(model, cfg, tokenizer)`` from a fused model directory (local, gs:// or s3://), in eval mode.

    ``dtype`` defaults to the dtype the weights were written in. ``decode_layout`` stores
    linear weights column-major for fast generation (:func:`column_major_linears`).
    """
    from mtnlg.formats.tokenizer import Tokenizer

    with storage.local_copy(directory) as local:
        manifest = read_manifest(local)
        if verify:
            verify_files(local, manifest)
        cfg = read_model_config(local)
        stored = {NAME_DTYPES.get(t.get("dtype")) for t in manifest.get("tensors", {}).values()}
        if dtype is None:
            dtype = stored.pop() if len(stored) == 1 and None not in stored else torch.float32
        model = build_empty_model(cfg, device, dtype)
        load_weights(model, local)
        tokenizer = Tokenizer.from_dir(local)
    if decode_layout:
        column_major_linears(model)
    model.eval()
    log.info("loaded %s: %d layers, hidden %d, %s", directory, cfg.num_layers, cfg.hidden_size,
             str(dtype).replace("torch.", ""))
    return model, cfg, tokenizer


def write_model_dir(out: str, cfg: ModelConfig, names: list[str], shapes: dict[str, tuple[int, ...]],
                    get: Callable[[str], torch.Tensor], dtype: str, tokenizer_files: dict[str, bytes | str],
                    max_shard_bytes: int = 2 << 30, **provenance: Any) -> dict[str, Any]:
    """Write a fused model directory into local ``out``; returns the manifest.

    ``get(name)`` produces each tensor when its turn comes (streaming); ``tokenizer_files``
    maps a file name to its bytes or a path (local, gs:// or s3://) to copy.
    """
    if dtype not in FUSE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(FUSE_DTYPES)}")
    torch_dtype = FUSE_DTYPES[dtype]
    os.makedirs(out, exist_ok=True)
    specs = [TensorSpec(n, tuple(shapes[n]), torch_dtype) for n in names]
    total = sum(s.nbytes for s in specs)
    prog = Progress("fuse", total=len(specs), unit="tensors")
    with ShardedSafetensorsWriter(out, specs, max_shard_bytes, metadata={"mtnlg_dtype": dtype}) as w:
        for n in names:
            w.write(n, get(n))
            prog.update(1)
    prog.close()
    with open(os.path.join(out, MODEL_CONFIG), "w", encoding="utf-8") as f:
        json.dump(to_dict(cfg), f, indent=2)
    for name, src in tokenizer_files.items():
        dst = os.path.join(out, name)
        if isinstance(src, bytes):
            with open(dst, "wb") as f:
                f.write(src)
        elif storage.is_remote(src):
            storage.copy(src, dst)
        else:
            shutil.copyfile(src, dst)  # no fsync: the staging directory is renamed as a whole
    side = [MODEL_CONFIG, *tokenizer_files]
    files = {**w.files, **hash_files(out, side)}
    return write_manifest(out, files, w.tensors, dtype=dtype, parameters=sum(
        numel(s.shape) for s in specs), weight_bytes=total, **provenance)


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def save_fused(model: torch.nn.Module, output: str, tokenizer, dtype: str = "fp32",
               max_shard_bytes: int = 2 << 30, **provenance: Any) -> dict[str, Any]:
    """Write an in-memory (single-device) ``GPT`` and its ``Tokenizer`` as a fused model
    directory (local, gs:// or s3://); returns the manifest. What ``MegatronLM.save`` uses."""
    sd = model.state_dict()
    names = list(expected_tensors(model))
    shapes = {k: tuple(sd[k].shape) for k in names}
    tok = {TOKENIZER_MODEL: tokenizer.model_bytes,
           TOKENIZER_META: (json.dumps(tokenizer.metadata(), indent=2) + "\n").encode()}
    with staged_output(output) as out:
        manifest = write_model_dir(out, model.cfg, names, shapes, lambda k: sd[k].detach().cpu(), dtype, tok,
                                   max_shard_bytes, source="in-memory model", **provenance)
    return manifest


@contextlib.contextmanager
def staged_output(output: str) -> Iterator[str]:
    """A local directory that becomes ``output`` only if the body succeeds: a failed fuse
    leaves no half-written model behind (locally: ``OUTPUT.partial`` renamed at the end;
    gs://, s3://: uploaded at the end)."""
    if storage.is_remote(output):
        with storage.local_dir_for_output(output) as out:
            yield out
        return
    final = os.path.abspath(output)
    partial = final.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(partial, final)
