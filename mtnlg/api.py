"""A small Python API over the whole pipeline.

    from mtnlg import MegatronLM, load_data

    model = MegatronLM(num_layers=4, hidden_size=128, num_heads=4)   # or MegatronLM(preset="tiny")
    data = load_data("notes.txt")           # a file, folder, glob, JSONL, gs:// or s3:// URI
    model.train(data, steps=200, tp=2, nproc=2, output="runs/notes")
    print(model.generate("The meeting", max_new_tokens=40))
    model.save("models/notes")              # a fused model directory
    model = MegatronLM.load("models/notes")
    logits = model([[1, 2, 3]])              # (1, 3, V_padded)
    model.module                             # the GPT itself, a torch.nn.Module

``train`` runs the same library steps the Kubeflow pipeline runs, on this machine:
extract (clean, filter, deduplicate, split) -> tokenize (SentencePiece) -> train
(``torchrun`` with ``nproc`` processes, tensor parallel degree ``tp``) -> fuse (one
safetensors model), each step given its typed config. Everything lands in the run
directory ``output``; the trained model is then loaded into this object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from mtnlg import storage
from mtnlg.config import load_config, merge, to_dict
from mtnlg.model.config import ModelConfig
from mtnlg.progress import get_logger

log = get_logger("mtnlg.api")

_TEXT_SUFFIXES = (".txt", ".text", ".txt.gz", ".text.gz")


@dataclass(frozen=True)
class Data:
    """Input files for :meth:`MegatronLM.train` (what :func:`load_data` found)."""

    inputs: tuple[str, ...]
    total_bytes: int

    def __repr__(self) -> str:
        return f"Data({len(self.inputs)} files, {self.total_bytes:,} bytes)"


def load_data(path: str | list[str]) -> Data:
    """Find the training text at ``path``: a file (.txt, .jsonl, .html, optionally .gz), a
    folder (read recursively), a glob, a gs:// or s3:// URI, or a list of those. Nothing is read yet."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    found: list[str] = []
    for p in paths:
        p = str(p)
        if storage.is_remote(p):
            found.extend(storage.expand([p]))
        elif storage.has_glob(p):
            found.extend(storage.expand([os.path.abspath(p)]))
        elif os.path.isdir(p):
            found.extend(storage.list_files(os.path.abspath(p)))
        elif os.path.exists(p):
            found.append(os.path.abspath(p))
        else:
            raise FileNotFoundError(f"load_data: {p} does not exist")
    if not found:
        raise FileNotFoundError(f"load_data: no files found at {path!r}")
    return Data(inputs=tuple(found), total_bytes=sum(storage.size(f) for f in found))


def _paragraph_documents(path: str, min_words: int = 60) -> list[str]:
    """A plain-text file as documents: runs of paragraphs of at least ``min_words`` words.

    The extract step reads a ``.txt`` file as ONE document, which cannot be split into
    training and validation text; a notes file or a book is really many documents.
    """
    import gzip

    raw = storage.read_bytes(path)
    text = (gzip.decompress(raw) if path.endswith(".gz") else raw).decode("utf-8", errors="replace")
    docs, cur, words = [], [], 0
    for para in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not para:
            continue
        cur.append(para)
        words += len(para.split())
        if words >= min_words:
            docs.append("\n\n".join(cur))
            cur, words = [], 0
    if cur:
        if docs and words < min_words:
            docs[-1] += "\n\n" + "\n\n".join(cur)
        else:
            docs.append("\n\n".join(cur))
    return docs


def _default_vocab_size(total_bytes: int) -> int:
    """A vocabulary the corpus can support: SentencePiece refuses sizes it cannot fill.

    Byte fallback needs 256 byte pieces plus the specials and characters, hence the floor.
    """
    v = int(total_bytes // 24)
    return max(384, min(32000, v // 64 * 64))


class MegatronLM:
    """A GPT you can train on your text, generate with, save and load.

        MegatronLM(24, 1024)                     # layers, hidden size (16 heads of 64)
        MegatronLM(num_layers=4, hidden_size=128, num_heads=4, seq_length=256)
        MegatronLM(preset="tiny")

    Sizes come from the two positional arguments and keyword arguments (any ``ModelConfig``
    field: ``num_layers``, ``hidden_size``, ``num_heads``, ``num_kv_heads``, ``seq_length``,
    ``position``, ``norm``, ``activation``, ...) applied over a named ``preset`` ("debug"
    when no sizes are given). Without ``num_heads``, a given ``hidden_size`` gets heads of
    64 (Megatron's GPT shapes). The model exists, with its parameters, as soon as it is
    built; its vocabulary is ``ModelConfig``'s default (512) until :meth:`train` sets it
    from the tokenizer trained on your data (or pass ``vocab_size=``).

    The object is not itself a ``torch.nn.Module`` (so ``train`` means one thing: train on
    data); the GPT is :attr:`module`, and calling the object runs it.
    """

    def __init__(self, num_layers: int | None = None, hidden_size: int | None = None, *, preset: str | None = None,
                 **model_fields: Any):
        from mtnlg.model.presets import get_preset

        if num_layers is not None:
            model_fields["num_layers"] = num_layers
        if hidden_size is not None:
            model_fields["hidden_size"] = hidden_size
        if "hidden_size" in model_fields and "num_heads" not in model_fields:
            model_fields["num_heads"] = max(1, int(model_fields["hidden_size"]) // 64)
        base = get_preset(preset or "debug") if preset or not model_fields else ModelConfig()
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(model_fields) - names)
        if unknown:
            raise TypeError(f"MegatronLM: unknown model setting {unknown[0]!r}; known: {', '.join(sorted(names))}")
        self.preset = preset
        self.cfg: ModelConfig = dataclasses.replace(base, **model_fields)
        self.tokenizer = None
        self.run: dict[str, Any] | None = None
        self._gpt: torch.nn.Module | None = None

    # ------------------------------------------------------------------ the model
    @property
    def module(self) -> torch.nn.Module:
        """The underlying ``GPT`` (randomly initialised until trained or loaded)."""
        if self._gpt is None:
            from mtnlg.model.gpt import GPT

            self._gpt = GPT(self.cfg)
        return self._gpt

    def parameters(self):
        return self.module.parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def __call__(self, token_ids) -> torch.Tensor:
        """Logits for token ids: a (B, T) or (T,) tensor or nested lists -> (B, T, V), V the
        vocabulary's size (``cfg.vocab_size``; the rows the model pads it with for tensor
        parallelism are left out), or (T, V) for 1-D input."""
        x = token_ids if isinstance(token_ids, torch.Tensor) else torch.tensor(token_ids, dtype=torch.long)
        squeeze = x.dim() == 1
        x = x.unsqueeze(0) if squeeze else x                                     # (B, T)
        model = self.module
        logits = model(x.to(next(model.parameters()).device))[..., :self.cfg.vocab_size]   # (B, T, V)
        return logits[0] if squeeze else logits

    # ------------------------------------------------------------------ training
    def train(self, data: Data | str, steps: int = 100, tp: int = 1, nproc: int | None = None,
              output: str | None = None, recipe: str = "debug", vocab_size: int | None = None,
              batch_size: int = 8, lr: float | None = None, overrides: list[str] | None = None,
              extract_overrides: list[str] | None = None, tokenize_overrides: list[str] | None = None,
              fuse_dtype: str = "fp32") -> Any:
        """Train on ``data`` (from :func:`load_data`, or a path): extract -> tokenize ->
        train -> fuse in the run directory ``output``, then load the result. Returns the run
        summary (paths, losses, timings).

        ``nproc`` defaults to ``tp``. ``overrides`` are extra ``key=value`` training
        settings (``train.micro_batch_size=2``, ``optim.lr=1e-3``, ...), applied last;
        ``extract_overrides`` and ``tokenize_overrides`` likewise for those steps.
        """
        from mtnlg.extract.config import ExtractConfig
        from mtnlg.fuse.config import FuseConfig
        from mtnlg.steps import extract_step, fuse_step, tokenize_step, train_step
        from mtnlg.tokenize.config import TokenizeConfig
        from mtnlg.train.config import TrainRunConfig
        from mtnlg.train.config import recipe as recipe_data

        if not isinstance(data, Data):
            data = load_data(data)
        nproc = nproc or tp
        output = output or os.path.join("runs", time.strftime("megatronlm-%Y%m%d-%H%M%S"))
        if not storage.is_remote(output):
            output = os.path.abspath(output)
        t0 = time.perf_counter()
        paths = {k: storage.join(output, k) for k in ("input", "extracted", "tokens", "train", "model")}

        inputs = self._prepare_inputs(data, paths["input"])
        log.info("extract: %d files -> %s", len(inputs), paths["extracted"])
        # short notes: a tenth held out, short documents kept, no fuzzy pass over a few files
        ext_cfg = load_config(ExtractConfig, overrides=extract_overrides,
                              base={"validation_fraction": 0.1, "filters": {"min_words": 5}, "dedup": {"fuzzy": False}})
        extract = extract_step(inputs, paths["extracted"], ext_cfg, workers=1).stats
        if not extract["splits"]["validation"]["docs"]:
            raise ValueError(f"only {extract['kept']} document(s) survived extraction and none fell into the "
                             f"validation split: give more text, or pass "
                             f"extract_overrides=['validation_fraction=0.3'] (stats: {paths['extracted']}/stats.json)")
        vocab = vocab_size or _default_vocab_size(data.total_bytes)
        tok_cfg = load_config(TokenizeConfig, overrides=tokenize_overrides, base={"vocab_size": vocab})
        tokenize = tokenize_step(paths["extracted"], paths["tokens"], tok_cfg).stats
        # this object's model (its vocabulary comes from the tokenizer) over the recipe
        model = {k: v for k, v in to_dict(self.cfg).items() if k != "vocab_size"}
        settings: dict[str, Any] = {"model": model, "parallel": {"tp": tp}, "checkpoint": {"load": "auto"},
                                    "train": {"steps": steps, "global_batch_size": batch_size}}
        if lr is not None:
            settings["optim"] = {"lr": lr, "min_lr": lr / 10}
        train_cfg = load_config(TrainRunConfig, overrides=overrides, base=merge(recipe_data(recipe), settings))
        summary = train_step(paths["tokens"], paths["train"], train_cfg, nproc=nproc).stats
        fused = fuse_step(paths["train"], paths["model"], FuseConfig(hf=False, dtype=fuse_dtype)).stats
        self._adopt(paths["model"])
        self.run = {"output": output, "paths": paths, "extract": extract, "tokenize": tokenize,
                    "train": summary, "fuse": fused, "seconds": time.perf_counter() - t0}
        log.info("trained in %.0fs: loss %s -> %s; model at %s", self.run["seconds"], summary.get("first_loss"),
                 summary.get("final_loss"), paths["model"])
        return self.run

    @staticmethod
    def _prepare_inputs(data: Data, staging: str) -> list[str]:
        """Plain-text files become JSONL documents (paragraph runs); others pass as they are."""
        out, text_files = [], []
        for f in data.inputs:
            (text_files if f.lower().endswith(_TEXT_SUFFIXES) else out).append(f)
        if text_files:
            lines = []
            for f in text_files:
                for i, doc in enumerate(_paragraph_documents(f)):
                    lines.append(json.dumps({"id": f"{f}#{i}", "text": doc, "source": f}))
            target = storage.join(staging, "text-documents.jsonl")
            storage.write_text(target, "\n".join(lines) + "\n")
            out.append(target)
        return out

    def _adopt(self, model_dir: str) -> None:
        from mtnlg.formats.fused import load_fused

        gpt, cfg, tok = load_fused(model_dir)
        self._gpt, self.cfg, self.tokenizer = gpt, cfg, tok
        self.model_dir = model_dir

    # ------------------------------------------------------------------ using it
    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"MegatronLM.{what}: the model has no tokenizer yet; train it "
                             "(model.train(data)) or load a trained one (MegatronLM.load(dir))")

    def generate(self, text: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> str:
        """The continuation of ``text`` (greedy unless ``temperature`` > 0)."""
        from mtnlg.model.decode import generate

        self._need_tokenizer("generate")
        return generate(self.module, self.tokenizer, text, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed)

    def chat(self, messages: list[dict] | None = None, **sampling: Any) -> str | list[dict]:
        """The assistant's reply to ``messages`` (``[{"role", "content"}, ...]``); without
        messages, an interactive conversation in the terminal."""
        from mtnlg.generate.chat import chat, chat_reply

        self._need_tokenizer("chat")
        if messages is None:
            return chat(self.module, self.tokenizer, **sampling)
        return chat_reply(self.module, self.tokenizer, messages, **sampling)

    def encode(self, text: str) -> list[int]:
        self._need_tokenizer("encode")
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        self._need_tokenizer("decode")
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ files
    def save(self, directory: str, dtype: str = "fp32") -> dict[str, Any]:
        """Write a fused model directory (safetensors + config + tokenizer + manifest)."""
        from mtnlg.formats.fused import save_fused

        self._need_tokenizer("save")
        return save_fused(self.module, directory, self.tokenizer, dtype=dtype)

    @classmethod
    def load(cls, directory: str, device: str = "cpu") -> "MegatronLM":
        """A model from a fused model directory (``mtnlg fuse`` output or ``save``)."""
        from mtnlg.formats.fused import load_fused

        gpt, cfg, tok = load_fused(directory, device=device)
        obj = cls(**dataclasses.asdict(cfg))
        obj._gpt, obj.tokenizer, obj.model_dir = gpt, tok, directory
        return obj

    def __repr__(self) -> str:
        c = self.cfg
        return (f"MegatronLM(layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}, seq={c.seq_length}, "
                f"vocab={c.vocab_size}, position={c.position}, norm={c.norm}, activation={c.activation}, "
                f"trained={self.tokenizer is not None})")
