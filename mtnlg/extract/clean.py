"""Text cleaning: UTF-8 decoding with counted replacements, NFC, control characters, whitespace.

Every document goes through ``decode_utf8`` (in the readers) and then ``clean_text``; the
same functions serve the Beam pipeline and the plain-Python reference loop, so both produce
the same bytes.
"""

from __future__ import annotations

import re
import unicodedata

REPLACEMENT = "\ufffd"
_REPLACEMENT_UTF8 = REPLACEMENT.encode("utf-8")

# C0/C1 controls except tab and newline; invisible format characters that carry no text
# (zero-width space, word joiner, BOM, soft hyphen, bidi embeddings/overrides/isolates).
# Zero-width (non-)joiners stay: scripts such as Persian and Devanagari need them.
_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
# Line and paragraph separators become newlines so that a JSON line never holds a character
# that some readers (str.splitlines) treat as a line break.
_NEWLINES = re.compile("\r\n|[\r\u2028\u2029]")
_HSPACE = re.compile(r"[^\S\n]+")  # any whitespace but a newline (tabs, NBSP, em space...)
_LINE_EDGE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def decode_utf8(data: bytes) -> tuple[str, int]:
    """``data`` as text and the number of invalid UTF-8 sequences replaced by U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # U+FFFD already present in the input is text, not a replacement.
        return text, text.count(REPLACEMENT) - data.count(_REPLACEMENT_UTF8)


def clean_text(text: str) -> str:
    """NFC-normalise, drop control/format characters, collapse whitespace.

    Runs of spaces and tabs become one space, lines are stripped, at most one blank line is
    kept between paragraphs, and the text is stripped at both ends.
    """
    text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text)
    # After the removals, so that characters they made adjacent are composed too.
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _HSPACE.sub(" ", text)
    text = _LINE_EDGE.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def normalize_for_hash(text: str) -> str:
    """The form two documents must share to be exact duplicates: case-folded, single-spaced."""
    return " ".join(text.casefold().split())
