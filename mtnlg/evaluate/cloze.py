"""LAMBADA-style cloze items made from held-out documents.

LAMBADA asks a model for the last word of a passage given everything before it. Here the
passages come from the validation documents: each document is cut into consecutive
passages of what fits in the model's window, and a passage's text is cut before its last
whole alphabetic word, which becomes the target::

    context: "... The sort() method modifies the list in"
    target:  " place"

A document's first passage starts with the end-of-document token, as documents do in
training; later passages start mid-document, without it. When there are more passages
than ``max_items``, evenly spaced ones are taken, so the items cover every document rather
than the first few. The context and the word are tokenized together and split where the
context's own tokens end, so the target tokens are exactly the ones the model would have
to produce. Every passage read is either an item or a skip with a reason, and the counts
add up (``passages == items + sum(skipped)``).
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
    start: int = 0       # token offset of the passage in that document


@dataclass
class ClozeStats:
    documents: int = 0   # documents the passages were cut from
    passages: int = 0    # passages read: items + skipped
    items: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {
        "empty": 0, "no_word": 0, "short_context": 0, "split_mismatch": 0, "too_long": 0})

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def as_dict(self) -> dict:
        return {"documents": self.documents, "passages": self.passages, "items": self.items,
                "skipped": dict(self.skipped)}


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
    """Up to ``max_items`` items from passages of ``documents`` (a sequence of token-id
    arrays, e.g. an ``IndexedDataset``), in document order; each item fits in
    ``seq_length`` positions."""
    items: list[ClozeItem] = []
    stats = ClozeStats()
    eod = tokenizer.eod_id
    budget = seq_length - 8  # room for the eod token and a target word of up to 7 tokens
    if budget < min_context_tokens + 1:
        raise ValueError(f"seq_length={seq_length} is too short for cloze items "
                         f"(needs at least {min_context_tokens + 9})")
    if max_items <= 0:
        return items, stats
    # every passage (document, token offset): cheap index arithmetic, no decoding
    passages = [(i, start) for i in range(len(documents))
                for start in range(0, max(len(documents[i]), 1), budget)]
    stride = max(1, len(passages) // max_items)
    docs_seen: set[int] = set()
    for i, start in passages[::stride]:
        if len(items) >= max_items:
            break
        stats.passages += 1
        docs_seen.add(i)
        ids = [int(t) for t in documents[i][start:start + budget + 1] if int(t) != eod]
        truncated = len(ids) > budget
        text = tokenizer.decode(ids[:budget])
        if truncated:
            text = text[:text.rfind(" ")] if " " in text else ""  # the cut may split a word
        if start > 0:  # a passage that starts mid-document may start mid-word
            text = text[text.find(" ") + 1:] if " " in text else ""
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
        head = [eod] if start == 0 else []
        if len(head) + len(full) > seq_length:  # model input: [eod] + context + target[:-1]
            stats.skip("too_long")
            continue
        items.append(ClozeItem(context=head + ctx, target=target, word=word, doc=i, start=start))
        stats.items += 1
    stats.documents = len(docs_seen)
    return items, stats
