"""The quality classifier, as GPT-3 (Brown et al. 2020, appendix A) and MT-NLG used one.

A logistic regression over hashed word uni- and bigrams (scikit-learn's
``HashingVectorizer`` and ``LogisticRegression``) is trained to tell a curated reference
corpus (positives) from a sample of the raw input (negatives). Every document that passed
the rules gets ``score``, the probability that it is curated text, and is kept by GPT-3's
rule::

    keep  <=>  rng.pareto(alpha) > 1 - score        (alpha = 9)

with ``rng`` a numpy ``Generator`` seeded by a BLAKE2b hash of the document id, so a rerun
keeps the same documents, whatever the worker or order. ``P(keep) = (2 - score) ** -alpha``:
1 at score 1, 0.42 at 0.9, 0.026 at 0.5, 0.002 at 0. The rule keeps some low-score text, which
GPT-3 did on purpose, so that the curated corpus's style does not become the only one.

The negatives are the ``n`` documents of the input with the smallest salted hashes of their
ids (``sample_key``): an exact-size sample that does not depend on reading order, which a
Beam ``Top`` combine computes the same way.

A classifier is saved as JSON (``save``/``load``, through ``mtnlg.storage``, so ``gs://`` and
``s3://`` work): the vectorizer's settings, the intercept and the non-zero weights. Nothing is
pickled; loading rebuilds the stateless vectorizer from its settings and scores with numpy.
scikit-learn is imported inside the functions that need it, so ``import mtnlg.extract``
works without it (it is the ``quality`` extra).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from mtnlg import storage
from mtnlg.extract.clean import clean_text
from mtnlg.extract.config import QualityConfig
from mtnlg.extract.readers import Failure, expand_setting, read_file
from mtnlg.extract.stats import CLASSIFIER_RULE

FORMAT = "mtnlg-quality-classifier"
VERSION = 1
RULE = CLASSIFIER_RULE  # the drop rule's name in stats.json: "quality_classifier"
DEFAULT_FILE = "quality_classifier.json"  # under the step's output when quality.save is empty
SCORE_DECIMALS = 4  # the score written with a document is the score the rule used
# The vectorizer: words of two or more word characters, lowercased, as uni- and bigrams,
# hashed into 2**18 columns without alternating signs, present or not (binary: counts made
# shuffled text look like its original), each row scaled to unit length.
VECTORIZER = {"n_features": 1 << 18, "ngram_range": [1, 2], "lowercase": True,
              "token_pattern": r"(?u)\b\w\w+\b", "alternate_sign": False, "binary": True, "norm": "l2"}
L2 = 1e-6  # L2 strength of the logistic regression (chosen on benchmarks/quality.py)
EPOCHS = 50  # passes over the training set at most
WEIGHT_DIGITS = 7  # significant digits kept of each weight: a file of short numbers


def _sklearn():
    try:
        import sklearn
        import sklearn.exceptions
    except ImportError:
        raise ImportError("the quality classifier needs scikit-learn: pip install 'mtnlg[quality]'") from None
    return sklearn


def _vectorizer(settings: dict[str, Any]):
    _sklearn()
    from sklearn.feature_extraction.text import HashingVectorizer

    s = dict(settings)
    return HashingVectorizer(n_features=s["n_features"], ngram_range=tuple(s["ngram_range"]),
                             lowercase=s["lowercase"], token_pattern=s["token_pattern"],
                             alternate_sign=s["alternate_sign"], binary=s["binary"], norm=s["norm"],
                             dtype=np.float64)


@dataclass
class QualityClassifier:
    """A trained model: ``score(text)`` is the probability that ``text`` is curated text."""

    weights: np.ndarray  # (n_features,) float64
    intercept: float
    vectorizer: dict[str, Any] = field(default_factory=lambda: dict(VECTORIZER))
    info: dict[str, Any] = field(default_factory=dict)  # how it was trained (counts, versions)

    def __post_init__(self):
        self._hasher = None

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts),) unrounded probabilities of "curated"."""
        if self._hasher is None:
            self._hasher = _vectorizer(self.vectorizer)
        from scipy.special import expit  # the logistic function, without overflow (scipy comes with sklearn)

        return expit(self._hasher.transform(texts) @ self.weights + self.intercept)  # (n,)

    def scores(self, texts: list[str]) -> list[float]:
        """The scores of ``texts``, rounded to ``SCORE_DECIMALS`` (what the keep rule uses)."""
        return [round(float(p), SCORE_DECIMALS) for p in self.probabilities(list(texts))]

    def score(self, text: str) -> float:
        return self.scores([text])[0]

    def to_json(self) -> str:
        nz = np.flatnonzero(self.weights)
        return json.dumps({"format": FORMAT, "version": VERSION, "vectorizer": self.vectorizer,
                           "intercept": float(self.intercept),
                           "weights": {"index": nz.tolist(), "value": self.weights[nz].tolist()},
                           "info": self.info}, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, name: str = "<string>") -> "QualityClassifier":
        """The classifier in ``text``; an error naming ``name`` when it is not one this
        version can read."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{name}: not a quality classifier file (not JSON: {e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{name}: not a quality classifier file (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise ValueError(f"{name}: quality classifier version {d.get('version')!r}; "
                             f"this mtnlg reads version {VERSION}")
        try:
            vec, w = d["vectorizer"], d["weights"]
            if set(vec) != set(VECTORIZER):
                raise ValueError(f"vectorizer keys {sorted(vec)}, expected {sorted(VECTORIZER)}")
            for k, v in VECTORIZER.items():
                if type(vec[k]) is not type(v):
                    raise ValueError(f"vectorizer.{k} is {vec[k]!r}, expected a {type(v).__name__}")
            n, ngrams = vec["n_features"], vec["ngram_range"]
            if n < 1 or len(ngrams) != 2 or not all(isinstance(g, int) and g >= 1 for g in ngrams):
                raise ValueError(f"vectorizer.n_features {n!r} or ngram_range {ngrams!r}")
            index = np.asarray(w["index"], dtype=np.int64)
            value = np.asarray(w["value"], dtype=np.float64)
            if index.ndim != 1 or index.shape != value.shape:
                raise ValueError(f"weights: {index.size} indices for {value.size} values")
            if index.size and (index.min() < 0 or index.max() >= n):
                raise ValueError(f"weights: an index outside [0, {n})")
            if not np.all(np.isfinite(value)) or not math.isfinite(float(d["intercept"])):
                raise ValueError("weights: a value that is not finite")
            weights = np.zeros(n, np.float64)
            weights[index] = value
            return cls(weights, float(d["intercept"]), dict(vec), dict(d.get("info") or {}))
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{name}: broken quality classifier file ({what})") from None

    def save(self, path: str) -> None:
        """Writes the classifier to ``path`` (local, gs:// or s3://; atomically)."""
        storage.write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "QualityClassifier":
        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"quality.classifier: {path} does not exist") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a quality classifier file (not UTF-8 text)") from None
        return cls.from_json(text, path)


def train_classifier(positives: Iterable[str], negatives: Iterable[str], *, l2: float | None = None,
                     vectorizer: dict[str, Any] | None = None) -> QualityClassifier:
    """A logistic regression of positives (label 1) against negatives (label 0), fitted by
    stochastic gradient descent (``SGDClassifier(loss="log_loss")``, L2 strength ``l2``), the
    classes weighted to count equally. The same texts in the same order give the same
    weights (the shuffling is seeded)."""
    l2 = L2 if l2 is None else l2
    pos, neg = list(positives), list(negatives)
    if not pos or not neg:
        raise ValueError(f"training the quality classifier needs both kinds of text: "
                         f"{len(pos)} positives, {len(neg)} negatives")
    sklearn = _sklearn()
    from sklearn.linear_model import SGDClassifier

    settings = dict(vectorizer or VECTORIZER)
    x = _vectorizer(settings).transform(pos + neg)  # (n_docs, n_features) sparse
    y = np.array([1] * len(pos) + [0] * len(neg))
    model = SGDClassifier(loss="log_loss", alpha=l2, class_weight="balanced", max_iter=EPOCHS, tol=1e-4,
                          random_state=0)
    with warnings.catch_warnings():  # stopping at EPOCHS is the plan, not a failure
        warnings.simplefilter("ignore", category=sklearn.exceptions.ConvergenceWarning)
        model.fit(x, y)
    info = {"positives": len(pos), "negatives": len(neg), "l2": l2, "epochs": int(model.n_iter_),
            "model": "SGDClassifier(loss=log_loss)", "scikit_learn": sklearn.__version__}
    # Rounded as the file holds them, so that a reloaded classifier scores exactly the same.
    weights = np.array([float(f"{w:.{WEIGHT_DIGITS}g}") for w in model.coef_[0].tolist()], np.float64)
    return QualityClassifier(weights, float(f"{model.intercept_[0]:.{WEIGHT_DIGITS}g}"), settings, info)


def _seed(doc_id: str, person: bytes, salt: int = 0) -> int:
    h = hashlib.blake2b(f"{salt}\n{doc_id}".encode("utf-8"), digest_size=8, person=person)
    return int.from_bytes(h.digest(), "little")


def keep(doc_id: str, score: float, alpha: float = 9.0) -> bool:
    """GPT-3's rule: keep when a Pareto(alpha) draw, seeded by the document id, exceeds
    ``1 - score``. The same id and score always give the same answer."""
    rng = np.random.default_rng(_seed(doc_id, b"mtnlg-keep"))
    return bool(rng.pareto(alpha) > 1.0 - score)


def sample_key(doc_id: str, seed: int = 0) -> int:
    """The negative sample holds the documents with the smallest keys."""
    return _seed(doc_id, b"mtnlg-negative", seed)


class NegativeSample:
    """The ``n`` documents with the smallest ``sample_key``, whatever order they are added in."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.seen = 0  # documents offered
        self._heap: list[tuple[int, _Reversed, str]] = []  # a max-heap of (key, id): the worst on top

    def add(self, doc_id: str, text: str) -> None:
        self.seen += 1
        item = (-sample_key(doc_id, self.seed), _Reversed(doc_id), text)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:
            heapq.heapreplace(self._heap, item)

    def texts(self) -> list[str]:
        """The sampled texts, by key (then id): the training order."""
        return [t for _, _, t in sorted(self._heap, reverse=True)]


class _Reversed(str):
    """A string that sorts backwards, so that of equal keys the smaller id ranks first."""

    def __lt__(self, other):
        return str.__gt__(self, other)

    def __gt__(self, other):
        return str.__lt__(self, other)


SAMPLE_WARN_FRACTION = 0.1


def sample_warning(sampled: int, documents: int) -> str | None:
    """A warning when the negatives are a large part of the input: the classifier learns the
    documents it was trained on as negatives, and scores most of them low."""
    if documents and sampled > SAMPLE_WARN_FRACTION * documents:
        return (f"quality.negatives: the negative sample holds {sampled} of the {documents} documents read "
                f"({sampled / documents:.0%}); the classifier learns each sampled document as low quality, so "
                f"a good one among them is usually dropped. Keep the sample a small part of the input "
                f"(quality.negatives), or train once on a large input and reuse it (quality.classifier)")
    return None


def sorted_sample(items: Iterable[tuple[str, str]], seed: int = 0) -> list[str]:
    """The texts of ``(id, text)`` pairs in training order (as ``NegativeSample.texts``)."""
    return [t for _, _, t in sorted((sample_key(i, seed), i, t) for i, t in items)]


def reference_texts(cfg: QualityConfig, max_doc_bytes: int, max_binary_fraction: float) -> list[str]:
    """The cleaned texts of ``quality.reference``, read as the step reads its inputs. A path
    that matches nothing, no file of a known format, or a record that cannot be read is an
    error naming it: a reference corpus silently cut short would train another classifier."""
    texts = []
    for path in expand_setting(cfg.reference, "quality.reference"):
        for rec in read_file(path, cfg.text_field, max_doc_bytes, max_binary_fraction):
            if isinstance(rec, Failure):
                raise ValueError(f"quality.reference: {rec.source}: {rec.reason}"
                                 + (f" ({rec.detail})" if rec.detail else ""))
            texts.append(clean_text(rec.text))
    return texts


def save_path(cfg: QualityConfig, output: str | None) -> str | None:
    """Where a trained classifier is written: ``quality.save``, else under the output."""
    if cfg.save:
        return cfg.save
    return storage.join(output, DEFAULT_FILE) if output else None


def classifier_for(cfg: QualityConfig, negatives: list[str], *, output: str | None, max_doc_bytes: int,
                   max_binary_fraction: float) -> QualityClassifier:
    """The classifier a run uses: loaded from ``quality.classifier``, or trained on
    ``quality.reference`` against ``negatives`` and saved (``save_path``)."""
    if cfg.classifier:
        return QualityClassifier.load(cfg.classifier)
    model = train_classifier(reference_texts(cfg, max_doc_bytes, max_binary_fraction), negatives)
    path = save_path(cfg, output)
    if path:
        model.save(path)
    return model
