"""The tokenize step: extracted JSONL -> SentencePiece model + Megatron ``.bin``/``.idx`` files.

    stats = tokenize("out/extracted", "out/tokens", TokenizeConfig(vocab_size=8000))

Input is ``mtnlg extract``'s output: ``<input>/<split>/*.jsonl`` with one
``{"id", "text", "source"}`` object per line. Output, in ``<output>/``:

* ``tokenizer.model`` (SentencePiece) and ``tokenizer.json`` (vocab size, special ids, options);
* ``<split>.bin`` + ``<split>.idx`` per split, one document per sequence, each ending with the
  end-of-document token (see ``mtnlg.formats.indexed_dataset`` for the bytes);
* ``stats.json``: documents read, kept and skipped (per reason), tokens, throughput.

The tokenizer is trained on a bounded sample of the ``train`` split, unless one is given.
Documents are encoded by a pool of processes, one chunk of input lines per task, and written
in input order, so the output is the same byte for byte whatever the number of workers.
Everything is written into a staging directory first and moved into place at the end,
``stats.json`` last: an output directory with a ``stats.json`` is complete.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from mtnlg import storage
from mtnlg.config import to_dict
from mtnlg.formats.indexed_dataset import IndexedDatasetBuilder, data_path, index_path, token_dtype
from mtnlg.formats.rundir import STATS_FILE, TOKENIZER_META, TOKENIZER_MODEL
from mtnlg.formats.tokenizer import Tokenizer
from mtnlg.progress import Progress, get_logger
from mtnlg.tokenize.config import SPECIAL_PIECES, TokenizeConfig

log = get_logger("mtnlg.tokenize.tokenize")

SKIP_REASONS = ("malformed_json", "missing_text", "empty_text", "empty_encoding")
_MAX_SENTENCE_BYTES = 1 << 14  # longer single lines are left out of tokenizer training


# ----------------------------------------------------------------------------- input


def split_files(input_dir: str, split: str, shown_as: str | None = None) -> list[str]:
    """The JSONL part files of one split of a local directory, sorted; an error if none.

    ``shown_as`` is the directory's name in messages (the gs:// or s3:// URI of a downloaded copy).
    """
    split_dir = os.path.join(input_dir, split)
    shown = storage.join(shown_as or input_dir, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"split directory {shown} does not exist "
                                f"(expected {split}/part-*.jsonl written by mtnlg extract)")
    files = [f for f in storage.list_files(split_dir) if f.endswith(".jsonl")]
    if not files:
        raise ValueError(f"split {split!r} is empty: {shown} holds no *.jsonl files")
    return files


def _chunks(path: str, chunk_bytes: int) -> list[tuple[str, int, int]]:
    """Byte ranges of ``path`` of about ``chunk_bytes``, each starting at a line start."""
    size = os.path.getsize(path)
    out, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            end = start + chunk_bytes
            if end >= size:
                end = size
            else:
                f.seek(end)
                f.readline()
                end = min(f.tell(), size)
            out.append((path, start, end))
            start = end
    return out


def _sample_lines(files: list[str], budget: int, block: int) -> tuple[list[str], int]:
    """Lines of text for tokenizer training: at most about ``budget`` bytes of JSONL.

    When the split is larger than the budget, ``budget // block`` blocks are read at evenly
    spaced offsets across the concatenated files (each from the next line start), so the
    sample spans the whole split, costs bounded I/O, and is the same on every run.
    Returns the lines and the number of JSONL bytes read.
    """
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    if total <= budget:
        ranges = [(f, 0, s) for f, s in zip(files, sizes)]
    else:
        n_blocks = max(1, budget // block)
        starts = (np.arange(n_blocks, dtype=np.int64) * total) // n_blocks
        bounds = np.cumsum([0] + sizes)
        ranges = []
        for g in starts.tolist():
            i = int(np.searchsorted(bounds, g, side="right")) - 1
            local = g - int(bounds[i])
            ranges.append((files[i], local, min(local + block, sizes[i])))
    lines: list[str] = []
    nbytes = 0
    for path, start, stop in ranges:
        with open(path, "rb") as f:
            f.seek(start)
            if start > 0:
                f.readline()  # finish the line the block starts in
            while f.tell() < stop:
                raw = f.readline()
                if not raw:
                    break
                nbytes += len(raw)
                try:
                    text = json.loads(raw).get("text")
                except (ValueError, AttributeError):
                    continue  # bad lines are counted when encoding
                if isinstance(text, str):
                    lines.extend(s for s in text.split("\n")
                                 if s.strip() and len(s) <= _MAX_SENTENCE_BYTES)
    return lines, nbytes


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(files: list[str], config: TokenizeConfig,
                    where: str | None = None) -> tuple[Tokenizer, dict]:
    """Train SentencePiece on a bounded sample of ``files`` (a split's JSONL parts).

    ``where`` names the split in messages (default: the files' directory).
    """
    import sentencepiece as spm

    t0 = time.perf_counter()
    lines, nbytes = _sample_lines(files, config.train_sample_bytes, config.train_block_bytes)
    where = where or (os.path.dirname(files[0]) if files else "the training split")
    if not lines:
        raise ValueError(f"no text to train the tokenizer on in {where}")
    log.info("training a %s tokenizer (vocab %d) on %d lines from %.1f MB of %s",
             config.model_type, config.vocab_size, len(lines), nbytes / 1e6, where)
    spm.set_random_generator_seed(config.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model,
            model_type=config.model_type, vocab_size=config.vocab_size,
            character_coverage=config.character_coverage, byte_fallback=config.byte_fallback,
            normalization_rule_name=config.normalization, remove_extra_whitespaces=False,
            split_digits=config.split_digits, allow_whitespace_only_pieces=True,
            user_defined_symbols=config.symbols(), max_sentence_length=_MAX_SENTENCE_BYTES,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=SPECIAL_PIECES[0],
            bos_piece=SPECIAL_PIECES[1], eos_piece=SPECIAL_PIECES[2], pad_piece=SPECIAL_PIECES[3],
            num_threads=config.train_threads, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(_explain_training_error(str(e), config, where)) from None
    tok = Tokenizer.from_bytes(model.getvalue(), name=f"tokenizer trained on {where}")
    info = {"trained": True, "sample_bytes": nbytes, "sample_lines": len(lines),
            "seconds": round(time.perf_counter() - t0, 3)}
    return tok, info


def _explain_training_error(msg: str, config: TokenizeConfig, where: str) -> str:
    m = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", msg)
    if m:
        return (f"vocab_size {m.group(1)} is larger than the tokenizer training text from {where} "
                f"supports (at most {m.group(2)} pieces); use --vocab-size {m.group(2)} or less, "
                f"or train on more text (train_sample_bytes={config.train_sample_bytes})")
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return (f"vocab_size {m.group(1)} is too small for the tokenizer training text from "
                f"{where}: its characters plus the special and byte pieces need {m.group(2)} ids; "
                f"use --vocab-size {m.group(2)} or more, or lower character_coverage "
                f"(now {config.character_coverage})")
    return f"SentencePiece training on {where} failed: {msg.strip()}"


def load_tokenizer(path: str) -> tuple[Tokenizer, dict]:
    tok = Tokenizer(path)
    return tok, {"trained": False, "source": path}


# ----------------------------------------------------------------------------- encoding

_worker: dict = {}


def _worker_init(model_bytes: bytes, eod_id: int, dtype: str) -> None:
    import sentencepiece as spm

    _worker["sp"] = spm.SentencePieceProcessor(model_proto=model_bytes)
    _worker["eod"] = eod_id
    _worker["dtype"] = np.dtype(dtype)


@dataclass
class _Chunk:
    lengths: np.ndarray  # (n,) int32 tokens per kept document, end-of-document included
    tokens: np.ndarray  # (sum(lengths),) the documents back to back
    read: int
    skipped: dict
    nbytes: int


def _encode_chunk(task: tuple[str, int, int]) -> _Chunk:
    """Parse and encode the JSONL lines in one byte range (runs in a worker process)."""
    path, start, end = task
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    skipped = collections.Counter()
    texts = []
    read = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        read += 1
        try:
            obj = json.loads(line)
        except ValueError:
            skipped["malformed_json"] += 1
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            skipped["missing_text"] += 1
        elif not text.strip():
            skipped["empty_text"] += 1
        else:
            texts.append(text)
    ids = _worker["sp"].encode(texts, num_threads=1) if texts else []
    kept = [r for r in ids if r]
    if len(kept) != len(ids):
        skipped["empty_encoding"] += len(ids) - len(kept)
    eod = _worker["eod"]
    for r in kept:
        r.append(eod)
    lengths = np.fromiter(map(len, kept), dtype=np.int32, count=len(kept))
    tokens = np.fromiter(itertools.chain.from_iterable(kept), dtype=_worker["dtype"],
                         count=int(lengths.sum(dtype=np.int64)))
    return _Chunk(lengths, tokens, read, dict(skipped), len(data))


class _Encoder:
    """Runs ``_encode_chunk`` over tasks, in order, on ``workers`` processes (or in-process)."""

    def __init__(self, tok: Tokenizer, dtype: np.dtype, workers: int):
        self.workers = workers
        args = (tok.model_bytes, tok.eod_id, dtype.str)
        self.pool = None
        if workers > 1:
            # fork is fastest, but only safe while this process runs no other threads.
            method = "fork" if ("fork" in multiprocessing.get_all_start_methods()
                                and threading.active_count() == 1) else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(workers, _worker_init, args)
        else:
            _worker_init(*args)

    def map(self, tasks):
        if self.pool is None:
            for t in tasks:
                yield _encode_chunk(t)
            return
        pending: collections.deque = collections.deque()
        for t in tasks:  # at most a few chunks in flight: memory stays bounded
            pending.append(self.pool.apply_async(_encode_chunk, (t,)))
            if len(pending) >= 2 * self.workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


def _encode_split(encoder: _Encoder, split: str, files: list[str], tasks: list, prefix: str,
                  dtype: np.dtype, where: str) -> dict:
    t0 = time.perf_counter()
    total_bytes = sum(os.path.getsize(f) for f in files)
    prog = Progress(f"tokenize {split}", total=total_bytes, unit="bytes")
    skipped = collections.Counter({r: 0 for r in SKIP_REASONS})
    read = 0
    with IndexedDatasetBuilder(prefix, dtype) as out:
        for chunk in encoder.map(tasks):
            out.add_documents(chunk.tokens, chunk.lengths)
            read += chunk.read
            skipped.update(chunk.skipped)
            prog.update(chunk.nbytes)
        if out.num_documents == 0:
            raise ValueError(f"split {split!r} ({where}) has no documents to tokenize: read {read}, "
                             f"skipped {dict(skipped)}")
        docs, tokens = out.num_documents, out.num_tokens
    prog.close()
    seconds = time.perf_counter() - t0
    if read != docs + sum(skipped.values()):  # every document read is kept or counted
        raise RuntimeError(f"split {split!r}: read {read} != kept {docs} + skipped {dict(skipped)}")
    return {
        "files": len(files), "bytes": total_bytes, "read": read, "documents": docs,
        "skipped": dict(skipped), "tokens": tokens,
        "tokens_per_document": round(tokens / docs, 3), "seconds": round(seconds, 3),
        "documents_per_s": round(docs / seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
        "bytes_per_s": round(total_bytes / seconds, 1),
    }


# ----------------------------------------------------------------------------- output


@contextlib.contextmanager
def _staging(output: str):
    """A local directory to build the output in (inside ``output`` when local: same disk)."""
    if storage.is_remote(output):
        stage = tempfile.mkdtemp(prefix="mtnlg-tokenize-")
    else:
        os.makedirs(output, exist_ok=True)
        for name in os.listdir(output):  # left by a run that was killed
            if name.startswith(".tokenize-") and name.endswith(".tmp"):
                shutil.rmtree(os.path.join(output, name), ignore_errors=True)
        stage = tempfile.mkdtemp(prefix=".tokenize-", suffix=".tmp", dir=output)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: str, output: str, names: list[str]) -> None:
    """Move (or upload) staged files into ``output``; ``stats.json`` goes last."""
    stats_dst = storage.join(output, STATS_FILE)
    if storage.exists(stats_dst):
        storage.remove(stats_dst)  # the directory is incomplete until the new stats.json lands
    for name in [n for n in names if n != STATS_FILE] + [STATS_FILE]:
        src, dst = os.path.join(stage, name), storage.join(output, name)
        if storage.is_remote(output):
            storage.copy(src, dst)
        else:
            os.replace(src, dst)


def _resolve_workers(workers: int) -> int:
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def tokenize(input_dir: str, output: str, config: TokenizeConfig | None = None) -> dict:
    """Tokenize every split of ``input_dir`` (local, gs:// or s3://) into ``output``; return the stats."""
    config = config or TokenizeConfig()
    input_dir, output = str(input_dir), str(output)
    t0 = time.perf_counter()
    if not storage.exists(input_dir):
        raise FileNotFoundError(f"input directory {input_dir} does not exist")
    workers = _resolve_workers(config.workers)
    with storage.local_copy(input_dir) as local_in, _staging(output) as stage:
        files = {s: split_files(local_in, s, input_dir) for s in config.splits}
        where = {s: storage.join(input_dir, s) for s in config.splits}

        if config.tokenizer:
            tok, tok_info = load_tokenizer(config.tokenizer)
        else:
            tok, tok_info = train_tokenizer(files["train"], config, where["train"])
            tok_info["sample_of"] = where["train"]
        if config.dtype == "auto":
            dtype = token_dtype(tok.vocab_size)
        else:
            dtype = np.dtype(config.dtype)
            if tok.vocab_size > np.iinfo(dtype).max + 1:
                raise ValueError(f"dtype {dtype} cannot hold the ids of {tok.name} "
                                 f"(vocab size {tok.vocab_size}); use dtype=auto")
        with open(os.path.join(stage, TOKENIZER_MODEL), "wb") as f:
            f.write(tok.model_bytes)
        # tokenizer.json describes the tokenizer alone, the same bytes on every run (no times)
        train_s = tok_info.pop("seconds", None)
        meta = {**tok.metadata(), "dtype": str(dtype),
                "user_defined_symbols": [] if config.tokenizer else config.symbols(),
                **tok_info}
        with open(os.path.join(stage, TOKENIZER_META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)

        tasks = {s: [t for f in fs for t in _chunks(f, config.chunk_bytes)] for s, fs in files.items()}
        encoder = _Encoder(tok, dtype, min(workers, max(1, sum(map(len, tasks.values())))))
        ok = False
        split_stats = {}
        try:
            for s in config.splits:
                split_stats[s] = _encode_split(encoder, s, files[s], tasks[s], os.path.join(stage, s),
                                               dtype, where[s])
            ok = True
        finally:
            encoder.close(ok)

        docs = sum(v["documents"] for v in split_stats.values())
        tokens = sum(v["tokens"] for v in split_stats.values())
        encode_s = sum(v["seconds"] for v in split_stats.values())
        skipped = collections.Counter()
        for v in split_stats.values():
            skipped.update(v["skipped"])
        stats = {
            "input": input_dir, "output": output,
            "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "dtype": str(dtype),
            "workers": encoder.workers,
            "read": sum(v["read"] for v in split_stats.values()),
            "documents": docs, "skipped": {r: skipped[r] for r in SKIP_REASONS},
            "tokens": tokens, "tokens_per_document": round(tokens / docs, 3),
            "encode_seconds": round(encode_s, 3),
            "documents_per_s": round(docs / encode_s, 1) if encode_s else 0.0,
            "tokens_per_s": round(tokens / encode_s, 1) if encode_s else 0.0,
            "seconds": round(time.perf_counter() - t0, 3),
            "tokenizer": meta, "tokenizer_train_seconds": train_s, "splits": split_stats,
            "config": to_dict(config),
        }
        with open(os.path.join(stage, STATS_FILE), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
        names = [TOKENIZER_MODEL, TOKENIZER_META]
        for s in config.splits:
            names += [os.path.basename(data_path(s)), os.path.basename(index_path(s))]
        _publish(stage, output, names + [STATS_FILE])
    log.info("tokenized %d documents into %d tokens (%s) in %.1fs -> %s",
             docs, tokens, ", ".join(f"{s}: {v['documents']} docs" for s, v in split_stats.items()),
             stats["seconds"], output)
    return stats
