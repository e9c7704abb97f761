"""Small real-text datasets for tests: extract-format JSONL and tokenized directories."""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path

WHATSNEW = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "python-docs", "whatsnew")


def whatsnew_paragraphs(max_files: int | None = None) -> list[str]:
    """Paragraphs (over 40 characters) of the bundled "What's New" texts, in file order."""
    docs: list[str] = []
    for path in sorted(glob.glob(os.path.join(WHATSNEW, "*.txt.gz")))[:max_files]:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs += [p for p in f.read().split("\n\n") if len(p.strip()) > 40]
    return docs


def write_extracted(root: Path, train: list[str], validation: list[str], source: str = "whatsnew") -> Path:
    """``root/{train,validation}/part-00000-of-00001.jsonl`` as the extract step writes them."""
    for split, part in (("train", train), ("validation", validation)):
        os.makedirs(root / split)
        with open(root / split / "part-00000-of-00001.jsonl", "w", encoding="utf-8") as f:
            for i, text in enumerate(part):
                f.write(json.dumps({"id": f"{split}-{i}", "text": text, "source": source}) + "\n")
    return root


def tokenized_dir(root: Path, train: list[str], validation: list[str], vocab_size: int = 512) -> str:
    """Extract-format JSONL under ``root/extracted``, tokenized into ``root/tok``."""
    from mtnlg.tokenize.config import TokenizeConfig
    from mtnlg.tokenize.tokenize import tokenize

    write_extracted(root / "extracted", train, validation)
    out = str(root / "tok")
    tokenize(str(root / "extracted"), out, TokenizeConfig(vocab_size=vocab_size, workers=1,
                                                          train_sample_bytes=1 << 20))
    return out
