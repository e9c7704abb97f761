"""Small real-text datasets for tests: extract-format JSONL and tokenized directories."""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path

# common English words, for generated prose the quality rules pass (stop words included)
COMMON_WORDS = """
the of and to in that is was he for it with as his on be at by had are but from or have an they
which one you were her all she there would their we him been has when who will more no if out so
said what up its about into than them can only other new some could time these two may then do first
any my now such like our over man me even most made after also did many before must through back
years where much your way well down should because each just those people how too little state good
very make world still own see men work long get here between both life being under never day same
another know while last might us great old year off come since against go came right used take three
""".split()

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
