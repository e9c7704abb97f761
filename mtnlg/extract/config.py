"""Configuration of the extract step: reading limits, quality rules, deduplication, split.

Every threshold has a name, so ``filters.min_words=20`` or ``dedup.threshold=0.7`` on the
command line (or the same keys in a YAML file) changes exactly one rule. The defaults follow
the Gopher quality rules (Rae et al. 2021), MT-NLG's fuzzy deduplication (MinHash LSH,
Jaccard >= 0.8), with two loosenings noted below for text that holds code, and MT-NLG's
downstream-task decontamination (13-grams, Megatron-LM's ``filter_ngrams.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtnlg.config import Config, ConfigError

# The quality rules, in the order they are checked; a document dropped by several rules is
# counted under the first one. ``filters.disabled`` takes names from this list.
RULES = (
    "min_words",
    "max_words",
    "mean_word_length",
    "alpha_words",
    "symbol_ratio",
    "bullet_lines",
    "ellipsis_lines",
    "duplicate_lines",
    "duplicate_line_chars",
    "stop_words",
    "language",
)


@dataclass
class FilterConfig(Config):
    """Document-level quality rules; a document failing one is dropped under its name."""

    min_words: int = field(default=50, metadata={"min": 0})
    max_words: int = field(default=100_000, metadata={"min": 1})
    min_mean_word_length: float = field(default=3.0, metadata={"min": 0.0})
    max_mean_word_length: float = field(default=10.0, metadata={"gt": 0.0})
    # Gopher asks 80% of words to contain a letter; documentation with code samples sits
    # lower (``=``, ``()``, ``>>>``), so the default is 0.7.
    min_alpha_word_fraction: float = field(default=0.7, metadata={"min": 0.0, "max": 1.0})
    # ('#' + ellipsis) per word.
    max_symbol_ratio: float = field(default=0.1, metadata={"min": 0.0})
    max_bullet_line_fraction: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})
    max_ellipsis_line_fraction: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})
    # Fraction of non-empty lines that repeat an earlier line, and the characters they hold.
    max_duplicate_line_fraction: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})
    max_duplicate_line_char_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    # At least this many distinct English stop words (the, be, to, of, and, that, have, with).
    min_stop_words: int = field(default=2, metadata={"min": 0})
    # Keep only documents in these languages (ISO 639-1 codes, e.g. ["en"]; empty: the rule
    # is off): the confidence lingua-language-detector gives them together, on the first
    # 2,000 characters, must reach min_language_confidence. Needs mtnlg[lang].
    languages: list[str] = field(default_factory=list)
    min_language_confidence: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    disabled: list[str] = field(default_factory=list)

    def validate(self) -> None:
        unknown = [r for r in self.disabled if r not in RULES]
        if unknown:
            raise ConfigError(f"filters.disabled: unknown rule(s) {unknown}; known rules: {', '.join(RULES)}")
        if self.max_words < self.min_words:
            raise ConfigError(f"filters.max_words ({self.max_words}) < filters.min_words ({self.min_words})")
        if self.max_mean_word_length < self.min_mean_word_length:
            raise ConfigError(f"filters.max_mean_word_length ({self.max_mean_word_length}) < "
                              f"filters.min_mean_word_length ({self.min_mean_word_length})")
        if self.languages:
            try:
                from lingua import IsoCode639_1
            except ImportError:
                raise ConfigError("filters.languages needs lingua-language-detector: "
                                  "pip install 'mtnlg[lang]'") from None
            def known(code: str) -> bool:
                try:
                    IsoCode639_1.from_str(code)
                except ValueError:
                    return False
                return code == code.lower()

            unknown = [code for code in self.languages if not known(code)]
            if unknown:
                raise ConfigError(f"filters.languages: {unknown} are not ISO 639-1 codes that "
                                  f"lingua-language-detector knows (lower case, e.g. 'en', 'de')")


@dataclass
class DedupConfig(Config):
    """Exact (normalised-text hash) then fuzzy (MinHash + LSH on word n-grams) deduplication."""

    exact: bool = True
    fuzzy: bool = True
    threshold: float = field(default=0.8, metadata={"gt": 0.0, "max": 1.0})  # Jaccard
    num_perm: int = field(default=128, metadata={"min": 1})
    bands: int = field(default=16, metadata={"min": 1})  # rows per band = num_perm / bands
    ngram: int = field(default=5, metadata={"min": 1})  # words per shingle
    seed: int = 1
    # Candidate buckets up to this size are verified pair by pair; larger ones (boilerplate
    # shared by many documents) only against their smallest id, to stay linear.
    max_bucket_all_pairs: int = field(default=32, metadata={"min": 2})
    # How near-duplicate pairs become groups: "distributed", the only way, on every runner:
    # rounds of the large-star and small-star operations inside Beam, with no step that
    # gathers pairs or documents. "auto", the former default, means the same and still
    # loads; "single" (the pairs gathered on one worker) is no longer part of the step.
    components: str = field(default="distributed", metadata={"choices": ("distributed", "auto", "single")})
    # Rounds of the distributed grouping (on a local engine the job runs at most 4 first and
    # reruns with max_rounds only when a group had not converged). A chain of n near-duplicates needs
    # about log2(n) (10,000 shuffled: 11), a near-duplicate group 2 or 3; stats.json's
    # fuzzy.unconverged_nodes says when a run needed more than max_rounds.
    max_rounds: int = field(default=16, metadata={"min": 1})

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    def validate(self) -> None:
        if self.components == "single":
            raise ConfigError("dedup.components: 'single' (near-duplicate pairs gathered on one worker) is no "
                              "longer part of the step; the groups are found inside Beam on every runner, with "
                              "the same result: remove the key or set 'distributed'")
        if self.num_perm % self.bands:
            raise ConfigError(f"dedup.num_perm ({self.num_perm}) must be a multiple of dedup.bands ({self.bands})")


@dataclass
class DecontaminateConfig(Config):
    """Evaluation text cut out of the train split: each word n-gram shared with an
    evaluation text is removed with ``margin_chars`` characters on each side, splitting the
    document (``mtnlg.extract.decontaminate``). The defaults are those of Megatron-LM's
    ``tools/openwebtext/filter_ngrams.py``, which MT-NLG used."""

    # The step's own validation split is evaluation text: what the evaluate step scores
    # (perplexity, cloze items) must not be trained on. On by default; false turns it off.
    validation: bool = True
    # Further evaluation texts: files, folders, globs, gs:// or s3:// URIs of JSONL (text
    # under text_field; e.g. lm-evaluation-harness task data), .txt or .html, optionally .gz.
    task_files: list[str] = field(default_factory=list)
    text_field: str = "text"  # JSONL key holding a task file's text
    ngram: int = field(default=13, metadata={"min": 1})  # words per n-gram
    # An evaluation text of min_ngram to ngram - 1 words is one shorter n-gram (Megatron's
    # --min-ngram-size); shorter texts are left out (min_ngram >= ngram: no shorter n-grams).
    min_ngram: int = field(default=8, metadata={"min": 1})
    margin_chars: int = field(default=200, metadata={"min": 0})  # removed on each side of a match
    # Widen each cut to the nearest sentence end ('.', '!', '?'), as Megatron's tool does;
    # false: exactly margin_chars.
    sentence_boundaries: bool = True
    min_piece_chars: int = field(default=200, metadata={"min": 1})  # shorter pieces are dropped
    max_pieces: int = field(default=10, metadata={"min": 1})  # more pieces: the document is dropped whole
    # An evaluation n-gram found in at least this many training documents is common text
    # (boilerplate, a licence, a famous quotation) and is not cut; 0: every n-gram is cut.
    # Megatron's --key-threshold, 10 there; 0 here, so that the train split holds no n-gram
    # of the validation split at all (costs a second pass over the train split when set).
    frequent_documents: int = field(default=0, metadata={"min": 0})

    @property
    def enabled(self) -> bool:
        return self.validation or bool(self.task_files)

    def validate(self) -> None:
        if not self.text_field:
            raise ConfigError("decontaminate.text_field: must name a JSONL key, got ''")
        empty = [i for i, f in enumerate(self.task_files) if not str(f).strip()]
        if empty:
            raise ConfigError(f"decontaminate.task_files: entry {empty[0]} is empty; give a path, glob or URI")


@dataclass
class QualityConfig(Config):
    """The quality classifier (``mtnlg.extract.quality``), as GPT-3 and MT-NLG used one: a
    linear model over hashed word uni- and bigrams, trained on a reference corpus
    (positives) against a seeded sample of the raw input (negatives), or loaded from a saved
    file. A document that passed the rules is kept when ``pareto(alpha) > 1 - score``, the
    draw seeded by its id; the others are dropped as ``quality_classifier``."""

    # Curated text to train on (the positives): files, folders, globs, gs:// or s3:// URIs
    # of JSONL (text under text_field), .txt or .html, optionally .gz. Empty: no training.
    reference: list[str] = field(default_factory=list)
    # A classifier saved by an earlier run (quality.save) to use instead of training one.
    classifier: str = ""
    text_field: str = "text"  # JSONL key holding a reference document's text
    # The Pareto shape of the keep rule: 9 in GPT-3. Larger keeps fewer low-score documents.
    alpha: float = field(default=9.0, metadata={"gt": 0.0})
    # Raw input documents sampled as negatives (the n smallest salted hashes of their ids).
    negatives: int = field(default=10_000, metadata={"min": 1})
    seed: int = 0  # salt of the negative sample
    # Where the trained classifier is written; empty: OUTPUT/quality_classifier.json.
    save: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.reference or self.classifier)

    def validate(self) -> None:
        if self.reference and self.classifier:
            raise ConfigError(f"quality.reference and quality.classifier are exclusive: train on "
                              f"{list(self.reference)} or load {self.classifier!r}, not both")
        if self.save and not self.reference:
            raise ConfigError(f"quality.save ({self.save!r}) is where a trained classifier is written; "
                              f"name the corpus to train it on in quality.reference")
        if not self.text_field:
            raise ConfigError("quality.text_field: must name a JSONL key, got ''")
        empty = [i for i, f in enumerate(self.reference) if not str(f).strip()]
        if empty:
            raise ConfigError(f"quality.reference: entry {empty[0]} is empty; give a path, glob or URI")


@dataclass
class ExtractConfig(Config):
    """The whole extract step. ``validation_fraction`` of documents (by id hash) go to validation."""

    text_field: str = "text"  # JSONL key holding the document text
    # A document (text file, JSONL line, HTML page) larger than this fails as "too_large".
    max_doc_bytes: int = field(default=8 << 20, metadata={"min": 1})
    # A file whose first 64 KiB hold more than this fraction of control bytes and invalid
    # UTF-8 fails as "binary".
    max_binary_fraction: float = field(default=0.1, metadata={"gt": 0.0, "max": 1.0})
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    validation_fraction: float = field(default=0.01, metadata={"min": 0.0, "max": 1.0})
    seed: int = 1234  # split hash salt
    num_shards: int = field(default=2, metadata={"min": 1})  # train shards (by id hash)
    validation_shards: int = field(default=1, metadata={"min": 1})
