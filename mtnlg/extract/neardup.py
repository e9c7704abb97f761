"""A corpus with known near-duplicates, and how well fuzzy deduplication finds them.

Real text has near-duplicates that nobody labelled; the bundled corpus has none at Jaccard
0.8. This module makes them: from real documents (``originals``) it derives variants by
deterministic edits of the kinds web text has, writes originals and variants shuffled
over JSONL files, and computes the truth from the exact Jaccard similarity of the
documents' word n-gram sets (the same shingles ``MinHasher`` uses):

* ``boilerplate``: a header and a footer of site chrome (10-30 words) around the text;
* ``substitute``: 0.5-2% of the words replaced (typos, other words);
* ``shuffle``: 2-4 pairs of adjacent sentences swapped;
* ``mixed``: boilerplate and substitution together;
* ``far``: 10-25% of the words replaced: related text that must *not* be dropped.

Two documents are near-duplicates when their exact Jaccard similarity is at least the
threshold; in each connected group of near-duplicates the smallest id is the one a
correct deduplication keeps (as ``mtnlg extract`` does), and every other member is one
it should drop. ``score`` compares what a run kept with that: recall (should-drop
documents dropped), precision (dropped documents that should have been), by edit kind
and by similarity.

    corpus = make_corpus(originals_from(texts), "neardup/", seed=0)
    # mtnlg extract neardup/ --output out/ ...
    print(score(corpus, kept_ids(["out/train", "out/validation"])))
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any

from mtnlg.extract.dedup import MinHasher, components
from mtnlg.extract.readers import doc_id

KINDS = ("boilerplate", "substitute", "shuffle", "mixed", "far")
_WEIGHTS = (0.25, 0.25, 0.2, 0.15, 0.15)
_HEADERS = (
    "Home | Docs | Blog | About us | Contact Skip to main content",
    "You are here: Home > Articles > Reference Last updated on 2021-03-04 by the editorial team",
    "Menu Search Sign in Register Share this page on social media Print this article",
    "Posted in Documentation and Guides Reading time about six minutes Comments are closed",
)
_FOOTERS = (
    "Copyright 2009-2021 All rights reserved. Privacy policy Terms of use Cookie settings",
    "Subscribe to our newsletter to get the latest updates delivered to your inbox every week",
    "Was this page helpful? Yes No Send feedback Report a problem with this page Back to top",
    "Related articles: Getting started, Frequently asked questions, Release notes, Glossary",
)


def originals_from(texts: Iterable[str], min_words: int = 250, max_words: int = 600) -> list[str]:
    """Documents of ``min_words``..``max_words`` words from consecutive pieces of real text
    (paragraphs joined; a longer piece is cut), in order: deterministic."""
    out: list[str] = []
    buf: list[str] = []
    n = 0
    for text in texts:
        words = text.split()
        while words:
            take = words[:max_words - n]
            words = words[len(take):]
            buf.append(" ".join(take))
            n += len(take)
            if n >= min_words:
                out.append("\n\n".join(buf))
                buf, n = [], 0
    return out


def replace_words(text: str, fraction: float, rng: random.Random) -> str:
    """``text`` with about ``fraction`` of its words replaced: half by a typo (two letters
    swapped), half by another word of the text or a new one."""
    words = text.split(" ")
    k = max(1, round(fraction * len(words)))
    for i in rng.sample(range(len(words)), min(k, len(words))):
        w = words[i]
        if len(w) > 3 and rng.random() < 0.5:  # a typo: two letters swapped
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        else:  # another word of the text, or a new one
            words[i] = rng.choice(words) if rng.random() < 0.5 else f"w{rng.randrange(10**6)}"
    return " ".join(words)


def _swap_sentences(text: str, swaps: int, rng: random.Random) -> str:
    sentences = re.split(r"(?<=[.!?])\s+", text)
    if len(sentences) < 3:
        return replace_words(text, 0.01, rng)
    for _ in range(swaps):
        i = rng.randrange(len(sentences) - 1)
        sentences[i], sentences[i + 1] = sentences[i + 1], sentences[i]
    return " ".join(sentences)


def edit(text: str, kind: str, rng: random.Random) -> str:
    """One variant of ``text`` made by the edit ``kind`` (see the module docstring)."""
    if kind == "boilerplate":
        return f"{rng.choice(_HEADERS)}\n\n{text}\n\n{rng.choice(_FOOTERS)}"
    if kind == "substitute":
        return replace_words(text, rng.uniform(0.005, 0.02), rng)
    if kind == "shuffle":
        return _swap_sentences(text, rng.randint(2, 4), rng)
    if kind == "mixed":
        return f"{rng.choice(_HEADERS)}\n\n{replace_words(text, rng.uniform(0.003, 0.01), rng)}"
    if kind == "far":
        return replace_words(text, rng.uniform(0.10, 0.25), rng)
    raise ValueError(f"unknown edit kind {kind!r}; expected one of {KINDS}")


def jaccard(a, b) -> float:
    """Exact Jaccard similarity of two shingle arrays (distinct values)."""
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(1, len(sa | sb))


@dataclass
class NearDupCorpus:
    """What ``make_corpus`` wrote: the files, every document's id, group, edit kind and
    exact similarity to its group's original, and the ids a correct run drops."""

    root: str
    threshold: float
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    should_drop: set[str] = field(default_factory=set)

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "docs": self.docs, "should_drop": sorted(self.should_drop)}


def make_corpus(originals: list[str], root: str, seed: int = 0, dup_fraction: float = 0.5,
                max_variants: int = 3, files: int = 4, threshold: float = 0.8, ngram: int = 5,
                name: str | None = None) -> NearDupCorpus:
    """Write ``originals`` and variants of a ``dup_fraction`` of them (1..``max_variants``
    each, edit kinds drawn with fixed weights) as ``files`` JSONL files under ``root``
    (``part-0000K.jsonl``, lines shuffled so a group spreads over files), plus
    ``truth.json``; returns the truth. Deterministic for a ``seed``. The ids are those
    ``mtnlg extract ROOT`` gives (1-based lines of files named relative to ROOT's parent);
    ``name`` is ROOT's name as the extract input sees it when the input is a folder above
    (``in/copy003`` for ``mtnlg extract in``)."""
    rng = random.Random(seed)
    entries: list[tuple[int, str, str]] = []  # (group, kind, text)
    for g, text in enumerate(originals):
        entries.append((g, "original", text))
        if rng.random() < dup_fraction:
            for _ in range(rng.randint(1, max_variants)):
                kind = rng.choices(KINDS, _WEIGHTS)[0]
                entries.append((g, kind, edit(text, kind, rng)))
    rng.shuffle(entries)
    os.makedirs(root, exist_ok=True)
    top = name or os.path.basename(os.path.abspath(root))  # ids: file names relative to ROOT's parent
    hasher = MinHasher(ngram=ngram)
    corpus = NearDupCorpus(root=root, threshold=threshold)
    by_group: dict[int, list[tuple[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(os.path.join(root, f"part-{k:05d}.jsonl"), "w", encoding="utf-8"))
                   for k in range(files)]
        lines = [0] * files
        for i, (g, kind, text) in enumerate(entries):
            k = i % files
            lines[k] += 1
            did = doc_id(f"{top}/part-{k:05d}.jsonl", lines[k])  # as `mtnlg extract ROOT` names it
            handles[k].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            corpus.docs[did] = {"group": g, "kind": kind}
            by_group.setdefault(g, []).append((did, hasher.shingles(text)))
    edges = []
    for members in by_group.values():
        original = next(sh for did, sh in members if corpus.docs[did]["kind"] == "original")
        for did, sh in members:
            corpus.docs[did]["jaccard"] = round(jaccard(sh, original), 4)
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                if jaccard(members[x][1], members[y][1]) >= threshold:
                    edges.append((members[x][0], members[y][0]))
    corpus.should_drop = {node for node, root_id in components(edges).items() if node != root_id}
    with open(os.path.join(root, "truth.json"), "w", encoding="utf-8") as f:
        json.dump(corpus.to_json(), f, indent=1, sort_keys=True)
    return corpus


def kept_ids(dirs: Iterable[str]) -> set[str]:
    """The ids of the documents an extract run wrote under ``dirs`` (its split folders)."""
    from mtnlg import storage

    ids: set[str] = set()
    for d in dirs:
        for path in storage.list_files(d):
            if path.endswith(".jsonl"):
                ids.update(json.loads(line)["id"] for line in storage.read_text(path).splitlines() if line)
    return ids


def score(corpus: NearDupCorpus, kept: set[str]) -> dict[str, Any]:
    """Recall and precision of a run that kept ``kept`` (every document of the corpus that
    is not kept counts as dropped: run it with the quality filters off), overall, by edit
    kind, and by exact similarity to the original."""
    dropped = set(corpus.docs) - kept
    tp, fp, fn = dropped & corpus.should_drop, dropped - corpus.should_drop, corpus.should_drop - dropped
    out: dict[str, Any] = {
        "documents": len(corpus.docs), "should_drop": len(corpus.should_drop), "dropped": len(dropped),
        "recall": len(tp) / max(1, len(corpus.should_drop)),
        "precision": len(tp) / max(1, len(dropped)),
        "false_positives": len(fp), "false_negatives": len(fn),
    }
    by_kind: dict[str, dict[str, int]] = {}
    for did in corpus.should_drop:
        k = by_kind.setdefault(corpus.docs[did]["kind"], {"should_drop": 0, "dropped": 0})
        k["should_drop"] += 1
        k["dropped"] += did in dropped
    out["recall_by_kind"] = {k: round(v["dropped"] / v["should_drop"], 4) for k, v in sorted(by_kind.items())}
    bins: dict[str, list[int]] = {}
    for did in corpus.should_drop:
        j = corpus.docs[did]["jaccard"]
        if corpus.docs[did]["kind"] == "original":
            continue
        label = next(b for lo, b in ((0.95, "0.95-1.00"), (0.9, "0.90-0.95"), (0.85, "0.85-0.90"),
                                     (0.8, "0.80-0.85"), (0.0, "<0.80")) if j >= lo)
        bins.setdefault(label, [0, 0])
        bins[label][0] += 1
        bins[label][1] += did in dropped
    out["recall_by_jaccard"] = {b: {"should_drop": n, "recall": round(d / n, 4)} for b, (n, d) in sorted(bins.items())}
    far = [did for did, d in corpus.docs.items() if d["kind"] == "far"]
    out["far_variants_kept"] = sum(did in kept for did in far) / max(1, len(far))
    return out
