"""Deterministic train/validation split by a salted hash of the document id."""

from __future__ import annotations

import hashlib

TRAIN, VALIDATION = "train", "validation"
SPLITS = (TRAIN, VALIDATION)


def split_of(doc_id: str, validation_fraction: float, seed: int) -> str:
    """``"validation"`` for a ``validation_fraction`` share of ids, else ``"train"``.

    Depends only on the id and the seed, so a document lands in the same split on every
    run, runner and worker count, and adding documents never moves existing ones.
    """
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode("utf-8"), digest_size=8).digest()
    return VALIDATION if int.from_bytes(h, "big") / 2.0**64 < validation_fraction else TRAIN
