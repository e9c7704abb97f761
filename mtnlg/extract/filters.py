"""Document quality rules in the spirit of Gopher (Rae et al. 2021, appendix A) and C4.

``first_failing_rule(text, cfg)`` returns the name of the first rule (in ``RULES`` order)
that ``text`` breaks, or None to keep it. Words are whitespace-separated tokens; lines are
the non-empty lines of the cleaned text.

=========================== ===============================================================
``min_words``/``max_words``  word count outside [min_words, max_words]
``mean_word_length``         mean word length outside [min, max] characters
``alpha_words``              too few words holding at least one letter
``symbol_ratio``             too many '#' and ellipses per word
``bullet_lines``             too many lines starting with a bullet
``ellipsis_lines``           too many lines ending with an ellipsis
``duplicate_lines``          too many lines repeating an earlier line
``duplicate_line_chars``     too many characters in such repeated lines
``stop_words``               too few distinct English stop words (not natural prose)
``language``                 not in ``languages`` (lingua-language-detector; off when empty)
=========================== ===============================================================
"""

from __future__ import annotations

import functools
import re

from mtnlg.extract.config import FilterConfig

# Gopher's stop-word rule: real English prose uses at least two of these.
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("\u2022", "\u2023", "\u25e6", "\u2043", "\u2219", "*", "-", "\u2013", "\u2014")
_ELLIPSES = ("...", "\u2026")
_LETTER = re.compile(r"[^\W\d_]")  # a Unicode letter


def _alpha_fraction(words: list[str]) -> float:
    # Most words are purely alphabetic (a C-level check); only the rest need the regex.
    search = _LETTER.search
    alpha = sum(1 for w in words if w.isalpha() or search(w))
    return alpha / len(words)


def _duplicate_lines(lines: list[str]) -> tuple[float, float]:
    """(fraction of lines, fraction of characters) that repeat an earlier line."""
    seen: set[str] = set()
    dup_lines = dup_chars = total_chars = 0
    for line in lines:
        total_chars += len(line)
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    return dup_lines / len(lines), dup_chars / max(total_chars, 1)


# The language is judged on the start of a document: the cost stays flat with its length.
LANGUAGE_SAMPLE_CHARS = 2000


@functools.lru_cache(maxsize=1)
def _language_detector():
    """One detector per process over every language lingua knows, in its low-accuracy mode
    (single n-gram size: ~80 MB of models, loaded on first use, instead of ~900 MB)."""
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def language_confidence(text: str, languages: list[str]) -> float:
    """The confidence (0-1) that the start of ``text`` is in one of ``languages`` (ISO 639-1)."""
    wanted = {code.upper() for code in languages}
    values = _language_detector().compute_language_confidence_values(text[:LANGUAGE_SAMPLE_CHARS])
    return sum(v.value for v in values if v.language.iso_code_639_1.name in wanted)


def first_failing_rule(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first rule ``text`` breaks, or None when it passes them all."""
    off = frozenset(cfg.disabled)
    words = text.split()
    n = len(words)
    if "min_words" not in off and n < cfg.min_words:
        return "min_words"
    if "max_words" not in off and n > cfg.max_words:
        return "max_words"
    if n == 0:
        return None  # the word rules below are undefined without words
    if "mean_word_length" not in off:
        mean = sum(map(len, words)) / n
        if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
            return "mean_word_length"
    if "alpha_words" not in off and _alpha_fraction(words) < cfg.min_alpha_word_fraction:
        return "alpha_words"
    if "symbol_ratio" not in off:
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / n > cfg.max_symbol_ratio:
            return "symbol_ratio"
    lines = [line for line in text.split("\n") if line]
    if lines:
        if "bullet_lines" not in off:
            bullets = sum(1 for line in lines if line.startswith(_BULLETS))
            if bullets / len(lines) > cfg.max_bullet_line_fraction:
                return "bullet_lines"
        if "ellipsis_lines" not in off:
            ellipsis = sum(1 for line in lines if line.endswith(_ELLIPSES))
            if ellipsis / len(lines) > cfg.max_ellipsis_line_fraction:
                return "ellipsis_lines"
        if "duplicate_lines" not in off or "duplicate_line_chars" not in off:
            line_frac, char_frac = _duplicate_lines(lines)
            if "duplicate_lines" not in off and line_frac > cfg.max_duplicate_line_fraction:
                return "duplicate_lines"
            if "duplicate_line_chars" not in off and char_frac > cfg.max_duplicate_line_char_fraction:
                return "duplicate_line_chars"
    if "stop_words" not in off and cfg.min_stop_words > 0:
        found = STOP_WORDS.intersection(w.lower() for w in words)
        if len(found) < cfg.min_stop_words:
            return "stop_words"
    if cfg.languages and "language" not in off and \
            language_confidence(text, cfg.languages) < cfg.min_language_confidence:
        return "language"
    return None

