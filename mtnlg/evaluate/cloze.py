"""LAMBADA-style cloze items made from held-out documents.

LAMBADA asks a model for the last word of a passage given everything before it. Here the
passages are the validation documents: each document's text (up to what fits in the
model's window) is cut before its last whole alphabetic word, which becomes the target::

    context: "... The sort() method modifies the list in"
    target:  " place"

The context and the word are tokenized together and split where the context's own tokens
end, so the target tokens are exactly the ones the model would have to produce. Every
document read is either an item or a skip with a reason, and the counts add up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_WORD = re.compile(r"\S+")
_TRAILING = ".,;:!?)]}\"'`"


@dataclass
class ClozeItem:
    context: list[int]   # end-of-document token + the passage's tokens before the word
    target: list[int]    # the tokens of " word"
    word: str
    doc: int             # index of the validation document it came from


@dataclass
class ClozeStats:
    documents: int = 0
    items: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {
        "empty": 0, "no_word": 0, "short_context": 0, "split_mismatch": 0, "too_long": 0})

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self) -> dict:
        return {"documents": self.documents, "items": self.items, "skipped": dict(self.skipped)}


def passage_and_word(text: str, min_word_len: int = 3) -> tuple[str, str] | None:
    """``(context, word)``: ``text`` cut before its last whole alphabetic word, or None."""
    for m in reversed(list(_WORD.finditer(text))):
        word = m.group().rstrip(_TRAILING)
        if len(word) >= min_word_len and word.isascii() and word.isalpha():
            context = text[:m.start()].rstrip()
            if context:
                return context, word
            return None
    return None


def make_cloze_items(documents, tokenizer, seq_length: int, max_items: int = 500,
                     min_context_tokens: int = 8) -> tuple[list[ClozeItem], ClozeStats]:
    """Up to ``max_items`` items from ``documents`` (a sequence of token-id arrays, e.g. an
    ``IndexedDataset``), in document order; each item fits in ``seq_length`` positions."""
    items: list[ClozeItem] = []
    stats = ClozeStats()
    eod = tokenizer.eod_id
    budget = seq_length - 8  # room for the eod token and a target word of up to 7 tokens
    if budget < min_context_tokens + 1:
        raise ValueError(f"seq_length={seq_length} is too short for cloze items "
                         f"(needs at least {min_context_tokens + 9})")
    for i in range(len(documents)):
        if len(items) >= max_items:
            break
        stats.documents += 1
        ids = [int(t) for t in documents[i][:budget + 1] if int(t) != eod]
        truncated = len(ids) > budget
        text = tokenizer.decode(ids[:budget])
        if truncated:
            text = text[:text.rfind(" ")] if " " in text else ""  # the cut may split a word
        if not text.strip():
            stats.skip("empty")
            continue
        found = passage_and_word(text)
        if found is None:
            stats.skip("no_word")
            continue
        context, word = found
        ctx = tokenizer.encode(context)
        if len(ctx) < min_context_tokens:
            stats.skip("short_context")
            continue
        full = tokenizer.encode(context + " " + word)
        if full[:len(ctx)] != ctx or len(full) == len(ctx):
            stats.skip("split_mismatch")
            continue
        target = full[len(ctx):]
        if len(full) > seq_length:  # model input: eod + context + target[:-1]
            stats.skip("too_long")
            continue
        items.append(ClozeItem(context=[eod] + ctx, target=target, word=word, doc=i))
        stats.items += 1
    return items, stats
