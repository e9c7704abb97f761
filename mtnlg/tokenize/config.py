"""Configuration of the tokenize step (``mtnlg tokenize``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtnlg.config import Config, ConfigError

# Pieces every trained model reserves, in id order: unk=0, bos=1, eos=2 (end of document), pad=3.
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
# A newline is always its own piece: documents keep their line structure (code, lists), and
# the trainer, which learns from single lines, would otherwise never see one.
NEWLINE = "\n"


@dataclass
class TokenizeConfig(Config):
    """How text becomes tokens.

    Training options apply only when ``tokenizer`` is unset; with it, the given SentencePiece
    model is used as is and its own vocabulary and special ids are reported.
    """

    # --- the SentencePiece model to train
    model_type: str = field(default="bpe", metadata={"choices": ("bpe", "unigram")})
    vocab_size: int = field(default=32000, metadata={"min": 8})
    character_coverage: float = field(default=0.9995, metadata={"gt": 0.0, "max": 1.0})
    # Unknown characters become their UTF-8 bytes instead of <unk>, so decode(encode(x)) == x.
    byte_fallback: bool = True
    # "identity" keeps text exactly; the nfkc variants fold compatibility characters.
    normalization: str = field(default="identity", metadata={
        "choices": ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")})
    split_digits: bool = True
    # Extra pieces that are never split (e.g. chat markers); the newline piece is always added.
    user_defined_symbols: list[str] = field(default_factory=list)
    # The tokenizer learns from at most this many bytes of the training split, read as evenly
    # spaced blocks across its files: bounded memory and time, and the same sample every run.
    train_sample_bytes: int = field(default=64 << 20, metadata={"min": 1})
    train_block_bytes: int = field(default=256 << 10, metadata={"min": 1024})
    seed: int = field(default=1234, metadata={"min": 0})
    # SentencePiece's result depends on its thread count, so training uses this fixed number
    # rather than the machine's core count: the same config gives the same model anywhere.
    train_threads: int = field(default=8, metadata={"min": 1})

    # --- reuse instead of training: a SentencePiece .model (local, gs:// or s3://)
    tokenizer: str | None = None

    # --- encoding
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    workers: int = field(default=0, metadata={"min": 0})  # 0 = every core
    chunk_bytes: int = field(default=1 << 20, metadata={"min": 1024})  # one unit of parallel work
    # Token dtype in .bin: "auto" = uint16 when every id fits, else int32.
    dtype: str = field(default="auto", metadata={"choices": ("auto", "uint16", "int32")})

    def validate(self) -> None:
        if not self.splits:
            raise ConfigError("splits: at least one split is needed, got []")
        if len(set(self.splits)) != len(self.splits):
            raise ConfigError(f"splits: names repeat in {self.splits}")
        for s in self.splits:
            if not s or "/" in s or s.startswith("."):
                raise ConfigError(f"splits: {s!r} is not a plain directory name")
        if self.tokenizer is None:
            if "train" not in self.splits:
                raise ConfigError("splits: the tokenizer is trained on the 'train' split, which is "
                                  f"missing from {self.splits}; add it or set tokenizer=MODEL")
            reserved = len(SPECIAL_PIECES) + len(self.symbols()) + (256 if self.byte_fallback else 0)
            if self.vocab_size <= reserved:
                raise ConfigError(
                    f"vocab_size: {self.vocab_size} leaves no room for learned pieces: "
                    f"{reserved} ids are reserved ({len(SPECIAL_PIECES)} special, "
                    f"{len(self.symbols())} user-defined"
                    + (", 256 byte-fallback" if self.byte_fallback else "") + ")")
            if self.dtype == "uint16" and self.vocab_size > 1 << 16:
                raise ConfigError(f"dtype: uint16 holds ids < 65536, but vocab_size is {self.vocab_size}; "
                                  "use dtype=int32 or dtype=auto")
        for s in self.user_defined_symbols:
            if not s:
                raise ConfigError("user_defined_symbols: an empty string is not a symbol")
            if s in SPECIAL_PIECES:
                raise ConfigError(f"user_defined_symbols: {s!r} is already a special piece")

    def symbols(self) -> list[str]:
        """User-defined pieces as trained: the newline first, then the configured ones."""
        return [NEWLINE] + [s for s in dict.fromkeys(self.user_defined_symbols) if s != NEWLINE]
