"""Precision and recall of the quality classifier on a labelled set.

Good documents are the bundled corpus's pages (data/corpus/python-docs) that pass the
extract step's rules; bad documents are generated low-quality text of three kinds, made to
pass those rules too (the classifier only ever sees documents that did):

* ``boilerplate``: navigation, cookie banners, share buttons, listings and footers;
* ``spam``: keyword spam, the corpus's own words stuffed into sales sentences;
* ``shuffled``: a real good document with its words shuffled (the same words as good text:
  only word order, the bigrams, tells them apart).

The good documents are cut by a hash of their ids into three disjoint parts:

* ``reference``: the curated corpus the classifier is trained on (the positives);
* ``pool``: raw input to sample the negatives from: its good documents and bad documents
  generated for them (``--bad-per-good`` of each kind per good document);
* ``test``: the documents scored, good ones and their own generated bad ones.

At scale the negative sample is a small part of the input, so almost every document scored
was not trained on; keeping ``pool`` and ``test`` apart measures that case. Each test
document is kept by GPT-3's rule (``keep``, alpha 9) and the figures are

    precision = kept & good / kept        recall = kept & good / good

with the keep rate of each kind, the scores' quantiles and the time to train and to score.
The step's classifier is ``SGDClassifier(loss="log_loss")``; ``--compare`` also trains
``LogisticRegression`` (lbfgs) on the same data.

    .venv/bin/python benchmarks/quality.py              # the whole corpus
    .venv/bin/python benchmarks/quality.py --compare    # LogisticRegression vs SGD
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "python-docs"
KINDS = ("boilerplate", "spam", "shuffled")
PARTS = ("reference", "pool", "test")

_NAV = ("Home", "About", "Blog", "Shop", "Contact", "Login", "Sign up", "Careers", "Press", "Help",
        "Pricing", "Features", "Support", "Community", "Events", "Partners", "Downloads", "News")
_BOILER = (
    "Skip to main content | {a} | {b} | {c} | {d}",
    "We use cookies to improve your experience on our site. By continuing to browse you agree to our "
    "use of cookies. Accept all | Settings",
    "Share this page: Facebook Twitter LinkedIn Email Print | {n} shares",
    "Sign in or register to save {a} items to your wishlist and get {n}% off your first order",
    "Copyright {y} {A} Inc. All rights reserved. Privacy policy | Terms of use | Cookie settings | Sitemap",
    "Posted by admin on {m} {d2}, {y} in {A}, {B} | {n} comments",
    "Related posts: {A} {B} tips and tricks, The best {b} of {y}, {C} for beginners",
    "Price: ${n}.99 Add to cart | In stock | Free shipping on orders over ${n2} | Compare",
    "Subscribe to our newsletter to receive the latest {b} news and offers from {A} each week",
    "You are here: {A} > {B} > {C} > Page {n}",
    "Follow us on social media and join {n},000 readers who love {b} and {c}",
    "Was this page helpful? Yes No | Report a problem with this page | Back to top",
    "Tags: {a}, {b}, {c}, {d}, {e} | Categories: {A}, {B}",
    "Showing {n} of {n2} results for {a} | Sort by: popularity, rating, newest, price",
    "Customers who bought {a} also bought {b} and {c}. See all {n} offers from ${n2}",
)
_SPAM = (
    "best {a} {b} cheap {a} online buy {c} now",
    "download free {a} {b} full version no registration",
    "top {n} {a} {b} deals of {y} with the lowest prices guaranteed",
    "{a} {b} {c} {a} {b} {c} {a} review and coupon codes",
    "click here to get the best {a} and {b} to your door today",
    "cheap {a} for sale {b} discount {c} sale {a} outlet",
    "how to get {a} free {b} hack {c} generator that works",
    "official {a} store buy {b} with free {c} shipping",
)
_MONTHS = ("January", "March", "May", "July", "September", "November")


def corpus_documents(max_files: int | None = None) -> list[tuple[str, str]]:
    """``(id, text)`` of the bundled corpus's documents that pass the extract step's rules
    (of ``max_files`` files, picked by a hash of their names, when given)."""
    from mtnlg.extract.clean import clean_text
    from mtnlg.extract.config import FilterConfig
    from mtnlg.extract.filters import first_failing_rule
    from mtnlg.extract.readers import Failure, expand_inputs, read_file, relative_names

    files, _ = expand_inputs([str(CORPUS)])
    names = relative_names([str(CORPUS)], files)
    if max_files:
        files = sorted(files, key=lambda f: hashlib.blake2b(names[f].encode(), digest_size=8).digest())[:max_files]
    rules = FilterConfig()
    docs = []
    for path in files:
        for rec in read_file(path, name=names[path]):
            if not isinstance(rec, Failure):
                text = clean_text(rec.text)
                if first_failing_rule(text, rules) is None:
                    docs.append((rec.id, text))
    return docs


def part_of(doc_id: str) -> str:
    return PARTS[hashlib.blake2b(doc_id.encode(), digest_size=8, person=b"quality-bench").digest()[0] % 3]


def _fill(template: str, vocab: list[str], rng: random.Random) -> str:
    w = lambda: rng.choice(vocab)  # noqa: E731
    return template.format(a=w(), b=w(), c=w(), d=w(), e=w(), A=w().title(), B=w().title(), C=w().title(),
                           n=rng.randint(2, 99), n2=rng.randint(100, 999), y=rng.randint(2005, 2025),
                           m=rng.choice(_MONTHS), d2=rng.randint(1, 28))


def boilerplate(vocab: list[str], rng: random.Random) -> str:
    lines = [" | ".join(rng.sample(_NAV, rng.randint(5, 9)))]
    while sum(len(x.split()) for x in lines) < rng.randint(80, 400):
        lines.append(_fill(rng.choice(_BOILER), vocab, rng))
    return "\n".join(lines)


def spam(vocab: list[str], rng: random.Random) -> str:
    keywords = rng.sample(vocab, 6)
    lines = []
    while sum(len(x.split()) for x in lines) < rng.randint(80, 400):
        lines.append(_fill(rng.choice(_SPAM), keywords, rng) + f" {rng.randint(1, 9999)}")
    return "\n".join(lines)


def shuffled(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return "\n".join(" ".join(words[i:i + 14]) for i in range(0, len(words), 14))


def labelled_set(docs: list[tuple[str, str]], bad_per_good: float = 3.0,
                 seed: int = 0) -> dict[str, list[tuple[str, str, str]]]:
    """``{part: [(id, kind, text), ...]}``: kind ``good`` or one of ``KINDS``. Generated
    documents that the rules would drop are left out (the classifier never sees them)."""
    from mtnlg.extract.config import FilterConfig
    from mtnlg.extract.filters import first_failing_rule

    rng = random.Random(seed)
    docs = sorted(docs)
    vocab = sorted({w.lower() for _, t in docs for w in t.split() if w.isalpha() and 4 <= len(w) <= 12})
    rules = FilterConfig()
    out: dict[str, list[tuple[str, str, str]]] = {p: [] for p in PARTS}
    for doc_id, text in docs:
        part = part_of(doc_id)
        out[part].append((doc_id, "good", text))
        if part == "reference":
            continue
        for kind in KINDS:
            n = int(bad_per_good) + (rng.random() < bad_per_good % 1)
            for k in range(n):
                bad = (boilerplate(vocab, rng) if kind == "boilerplate" else
                       spam(vocab, rng) if kind == "spam" else shuffled(text, rng))
                if first_failing_rule(bad, rules) is None:
                    out[part].append((f"{doc_id}-{kind}{k}", kind, bad))
    return out


def measure(parts: dict[str, list[tuple[str, str, str]]], alpha: float = 9.0, model: str = "sgd",
            negatives: int = 10_000, seed: int = 0, l2: float | None = None, check_reload: bool = True) -> dict:
    """Trains on reference vs a sample of pool, keeps test documents by the rule; the figures."""
    import numpy as np

    from mtnlg.extract.quality import L2, NegativeSample, QualityClassifier, keep, train_classifier

    l2 = L2 if l2 is None else l2
    positives = [t for _, _, t in parts["reference"]]
    sample = NegativeSample(negatives, seed)
    for doc_id, _, text in parts["pool"]:
        sample.add(doc_id, text)
    t0 = time.perf_counter()
    if model == "sgd":
        clf = train_classifier(positives, sample.texts(), l2=l2)
    else:
        clf = _train_logistic(positives, sample.texts())
    train_s = time.perf_counter() - t0
    test = parts["test"]
    t0 = time.perf_counter()
    scores = clf.scores([t for _, _, t in test])
    score_s = time.perf_counter() - t0
    good = [kind == "good" for _, kind, _ in test]

    def kept_at(a: float) -> list[bool]:
        return [keep(doc_id, s, a) for (doc_id, _, _), s in zip(test, scores)]

    def precision_recall(kept: list[bool]) -> list[float]:
        kept_good = sum(k and g for k, g in zip(kept, good))
        return [round(kept_good / max(1, sum(kept)), 4), round(kept_good / max(1, sum(good)), 4)]

    kept = kept_at(alpha)
    kept_good = sum(k and g for k, g in zip(kept, good))
    by_kind: dict[str, dict] = {}
    for (_, kind, _), s, k in zip(test, scores, kept):
        d = by_kind.setdefault(kind, {"docs": 0, "kept": 0, "scores": []})
        d["docs"] += 1
        d["kept"] += k
        d["scores"].append(s)
    test_bytes = sum(len(t.encode()) for _, _, t in test)
    out = {
        "model": model, "alpha": alpha, "l2": l2 if model == "sgd" else None, "epochs": clf.info.get("epochs"),
        "reference": len(positives), "negatives": len(sample.texts()),
        "negatives_good": sum(1 for i, k, _ in parts["pool"] if k == "good"),
        "test": len(test), "test_good": sum(good),
        "kept": sum(kept), "kept_good": kept_good,
        "precision": round(kept_good / max(1, sum(kept)), 4), "recall": round(kept_good / max(1, sum(good)), 4),
        "precision_recall_by_alpha": {a: precision_recall(kept_at(a)) for a in (1.0, 2.0, 4.0, 9.0)},
        "by_kind": {k: {"docs": d["docs"], "kept": d["kept"], "keep_rate": round(d["kept"] / d["docs"], 4),
                        "score_p10_p50_p90": [round(float(q), 4) for q in np.quantile(d["scores"], [0.1, 0.5, 0.9])]}
                    for k, d in sorted(by_kind.items())},
        "train_s": round(train_s, 2), "score_s": round(score_s, 2),
        "score_mb_per_s": round(test_bytes / 1e6 / max(score_s, 1e-9), 2),
    }
    if check_reload:  # the file, and the scores of a classifier loaded from it
        saved = clf.to_json()
        out["file_bytes"] = len(saved)
        out["reloaded_equal"] = QualityClassifier.from_json(saved).scores([t for _, _, t in test]) == scores
    return out


def _train_logistic(positives: list[str], negatives: list[str]):
    """The same features with ``LogisticRegression(C=100)`` (lbfgs), for --compare."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from mtnlg.extract.quality import VECTORIZER, QualityClassifier, _vectorizer

    x = _vectorizer(VECTORIZER).transform(positives + negatives)
    y = np.array([1] * len(positives) + [0] * len(negatives))
    m = LogisticRegression(C=100.0, class_weight="balanced", solver="lbfgs", max_iter=1000).fit(x, y)
    return QualityClassifier(m.coef_[0].astype(np.float64), float(m.intercept_[0]), dict(VECTORIZER),
                             {"model": "LogisticRegression"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bad-per-good", type=float, default=3.0, help="generated documents of each kind per good one")
    ap.add_argument("--alpha", type=float, default=9.0)
    ap.add_argument("--negatives", type=int, default=10_000, help="negative sample size (from pool)")
    ap.add_argument("--max-files", type=int, default=None, help="read only this many corpus files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="also train LogisticRegression (lbfgs)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    parts = labelled_set(corpus_documents(args.max_files), args.bad_per_good, args.seed)
    print(json.dumps({"labelled_set_s": round(time.perf_counter() - t0, 1),
                      **{p: len(v) for p, v in parts.items()}}), flush=True)
    for model in ("sgd", "logistic") if args.compare else ("sgd",):
        print(json.dumps(measure(parts, args.alpha, model, args.negatives, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
