"""The tokenizer the trainer and evaluator use: a SentencePiece model plus its special ids.

    tok = Tokenizer.from_dir("out/tokens")        # tokenizer.model (+ tokenizer.json)
    ids = tok.encode("Hello world")               # list[int], no end-of-document token
    tok.decode(ids + [tok.eod_id]) == "Hello world"
"""

from __future__ import annotations

import hashlib
import json

from mtnlg import storage
from mtnlg.formats.rundir import TOKENIZER_META, TOKENIZER_MODEL

_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes):
    """Yield ``(field_number, value)`` of one protobuf message (bytes for length-delimited)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf field")
        yield num, val


def model_info(proto: bytes) -> dict:
    """Model type, byte fallback and normalizer of a serialized SentencePiece ``ModelProto``.

    Read with a few lines of wire-format parsing because the ``sentencepiece_model_pb2``
    module shipped with sentencepiece needs a newer protobuf runtime than other packages allow.
    """
    info = {"model_type": "unknown", "byte_fallback": False, "normalization": "unknown",
            "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for num, val in _fields(proto):
        if num == 2:  # TrainerSpec
            for n, v in _fields(val):
                if n == 3:
                    info["model_type"] = _MODEL_TYPES.get(v, f"type-{v}")
                elif n == 35:
                    info["byte_fallback"] = bool(v)
        elif num == 3:  # NormalizerSpec
            for n, v in _fields(val):
                if n == 1:
                    info["normalization"] = v.decode("utf-8", "replace")
                elif n == 3:
                    info["add_dummy_prefix"] = bool(v)
                elif n == 4:
                    info["remove_extra_whitespaces"] = bool(v)
    return info


class Tokenizer:
    """A SentencePiece model (local path, gs:// or s3://) with its end-of-document id."""

    def __init__(self, model_path: str, eod_id: int | None = None):
        model_path = str(model_path)
        try:
            data = storage.read_bytes(model_path)
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer model {model_path} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"tokenizer model {model_path} is a directory; "
                             "use Tokenizer.from_dir for a tokenized output directory") from None
        self._load(data, model_path, eod_id)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>", eod_id: int | None = None) -> "Tokenizer":
        tok = cls.__new__(cls)
        tok._load(data, name, eod_id)
        return tok

    @classmethod
    def from_dir(cls, tokenized_dir: str) -> "Tokenizer":
        """The tokenizer of a ``mtnlg tokenize`` output directory (ids from its tokenizer.json)."""
        meta_path = storage.join(tokenized_dir, TOKENIZER_META)
        eod = None
        if storage.exists(meta_path):
            try:
                eod = int(json.loads(storage.read_text(meta_path))["eod_id"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{meta_path}: not a valid tokenizer description ({e})") from None
        return cls(storage.join(tokenized_dir, TOKENIZER_MODEL), eod_id=eod)

    def _load(self, data: bytes, name: str, eod_id: int | None) -> None:
        import sentencepiece as spm

        self.name = name
        if not data:
            raise ValueError(f"tokenizer model {name} is empty")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
            info = model_info(data)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"tokenizer model {name} is not a valid SentencePiece model "
                             f"({str(e).strip() or type(e).__name__})") from None
        self.model_bytes = data
        self.model_type = info["model_type"]
        self.byte_fallback = info["byte_fallback"]
        self.normalization = info["normalization"]
        self.add_dummy_prefix = info["add_dummy_prefix"]
        self.remove_extra_whitespaces = info["remove_extra_whitespaces"]
        self.vocab_size = int(self.sp.vocab_size())
        self.unk_id = int(self.sp.unk_id())
        self.bos_id = int(self.sp.bos_id())
        self.pad_id = int(self.sp.pad_id())
        self.eod_id = int(self.sp.eos_id()) if eod_id is None else int(eod_id)
        if not 0 <= self.eod_id < self.vocab_size:
            raise ValueError(f"tokenizer model {name} has no end-of-document token "
                             f"(eos id {self.eod_id}); train it with an eos piece")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the end-of-document token."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        """Text of ``ids`` (a list or integer array); control tokens (eod, bos, pad) vanish."""
        import numpy as np

        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(arr[bad][0])} is outside the vocabulary of {self.name} "
                             f"(size {self.vocab_size})")
        return self.sp.decode(arr.tolist())

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def metadata(self) -> dict:
        """What ``tokenizer.json`` records beside the model."""
        return {
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "bos_id": self.bos_id,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
            "model_type": self.model_type,
            "byte_fallback": self.byte_fallback,
            "normalization": self.normalization,
            "sha256": hashlib.sha256(self.model_bytes).hexdigest(),
        }

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


#: ``mtnlg.generate.chat.format_chat`` as a Hugging Face chat template, after the end-of-document
#: token that starts every prompt (``mtnlg.model.decode.prompt_ids_for``): a tokenizer's
#: ``apply_chat_template(messages, add_generation_prompt=True)`` gives the token ids a server
#: runs for a chat request. The Hugging Face export carries it (``tokenizer_config.json``).
CHAT_TEMPLATE = (
    "{{- eos_token if eos_token is defined else '' -}}"
    "{%- set tags = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'} -%}"
    "{%- for message in messages -%}"
    "{{ tags[message['role']] + ': ' + (message['content'] | string).split() | join(' ') }}"
    "{%- if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)
