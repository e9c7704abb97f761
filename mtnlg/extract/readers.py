"""Readers: one input file -> documents, or failures with a named reason.

A document is one text file, one JSONL line, or one HTML page. The format comes from the
file name (``.txt``, ``.jsonl``/``.json``/``.ndjson``, ``.html``/``.htm``, each optionally
``.gz``). Reading never raises: whatever goes wrong is yielded as a :class:`Failure`, so the
caller can count it. The reasons:

==================== ====================================================================
``unreadable``       the file cannot be opened or read (permissions, vanished, I/O error)
``corrupt_gzip``     a ``.gz`` file that is not gzip, or is truncated/damaged part-way (a
                     JSONL file keeps its records before the cut; the cut is one failure)
``binary``           more than ``max_binary_fraction`` control bytes / invalid UTF-8
``nul_byte``         text holding a NUL byte (a sign of corruption in a text file)
``too_large``        a document (file, or JSONL line) over ``max_doc_bytes``
``empty``            an empty or whitespace-only file (or a JSONL file without records)
``invalid_json``     a JSONL line that is not JSON
``missing_text_field`` a JSONL line without a string under the configured text field
``invalid_html``     a page the HTML parser gives up on
==================== ====================================================================
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from html.parser import HTMLParser
from typing import IO, Iterator, NamedTuple

from mtnlg import storage
from mtnlg.extract.clean import decode_utf8

FAILURE_REASONS = ("unreadable", "corrupt_gzip", "binary", "nul_byte", "too_large", "empty",
                   "invalid_json", "missing_text_field", "invalid_html")

FORMATS = {
    ".txt": "text", ".text": "text",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".html": "html", ".htm": "html", ".xhtml": "html",
}

_SNIFF_BYTES = 64 << 10
# Bytes that do not occur in text: C0 controls except \t \n \f \r and ESC, plus DEL.
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13, 27)) + b"\x7f"


class Document(NamedTuple):
    id: str
    source: str
    text: str
    nbytes: int  # bytes as read (decompressed), before cleaning
    replaced: int  # invalid UTF-8 sequences replaced by U+FFFD


class Failure(NamedTuple):
    reason: str  # one of FAILURE_REASONS
    source: str
    nbytes: int
    detail: str = ""


def detect_format(path: str) -> str | None:
    """``"text"``, ``"jsonl"`` or ``"html"`` from the file name, or None when unknown."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(".gz"):
        name = name[:-3]
    dot = name.rfind(".")
    return FORMATS.get(name[dot:]) if dot > 0 else None


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(files to read, files skipped) for paths, directories and globs, local, gs:// or s3://.

    A file named directly is read whatever its name (unknown extensions as plain text);
    files found in a directory or by a glob are read only when their extension names a
    known format, the others are returned as skipped (READMEs, licences, images...). An
    input that matches nothing raises ``FileNotFoundError`` naming it.
    """
    files: list[str] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        item = str(item)
        matched = storage.expand([item])
        direct = matched == [item] and not storage.has_glob(item)
        for f in matched:
            if f in seen:
                if direct and f in skipped:  # named directly after a directory skipped it
                    skipped.remove(f)
                    files.append(f)
                continue
            seen.add(f)
            (files if direct or detect_format(f) else skipped).append(f)
    return files, skipped


def expand_setting(paths: list[str] | tuple[str, ...], key: str) -> list[str]:
    """The files of a setting that names inputs besides the step's own (``key``, e.g.
    ``quality.reference``), expanded as the inputs are; a path that matches nothing, or no file
    of a known format, is a ``FileNotFoundError`` naming the setting."""
    try:
        files, _ = expand_inputs(list(paths))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}: {e}") from None
    if not files:
        raise FileNotFoundError(f"{key}: no file of a known format in {list(paths)}")
    return files


def relative_names(inputs: list[str], files: list[str]) -> dict[str, str]:
    """Each file's name relative to the input that found it (``corpus/faq/a.html`` for the
    input ``/data/corpus``), so that document ids, and with them the train/validation split
    and which duplicate is kept, do not depend on where the data lies."""
    names: dict[str, str] = {}
    for f in files:
        for item in inputs:
            item = str(item)
            if storage.has_glob(item):
                wild = min(i for i in (item.find(c) for c in "*?[") if i >= 0)
                base = item[:wild].rsplit("/", 1)[0]
            elif f == item:
                base = item.rsplit("/", 1)[0] if "/" in item else ""
            elif f.startswith(item.rstrip("/") + "/"):
                base = item.rstrip("/").rsplit("/", 1)[0] if "/" in item.rstrip("/") else ""
            else:
                continue
            if f.startswith(base):
                names[f] = f[len(base):].lstrip("/")
                break
        names.setdefault(f, f.rsplit("/", 1)[-1])
    return names


def doc_id(name: str, index: int) -> str:
    """A stable id: a hash of the file's relative name and the document's index (line) in it."""
    return hashlib.blake2b(f"{name}\n{index}".encode("utf-8"), digest_size=8).hexdigest()


def binary_fraction(data: bytes) -> float:
    """Fraction of control bytes and invalid UTF-8 sequences in the first 64 KiB of ``data``."""
    sample = data[:_SNIFF_BYTES]
    if not sample:
        return 0.0
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    _, replaced = decode_utf8(sample)
    return (controls + replaced) / len(sample)


class _Prefixed(io.RawIOBase):
    """A stream that first returns ``head`` (already read for sniffing), then ``rest``."""

    def __init__(self, head: bytes, rest: IO[bytes]):
        self._head, self._pos, self._rest = head, 0, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self._pos < len(self._head):
            n = min(len(buf), len(self._head) - self._pos)
            buf[:n] = self._head[self._pos:self._pos + n]
            self._pos += n
            return n
        # Small reads: a damaged gzip raises without returning what it decoded in the call.
        data = self._rest.read(min(len(buf), _SNIFF_BYTES))
        buf[:len(data)] = data
        return len(data)


class _TolerantGzip(io.RawIOBase):
    """A gzip stream that hands out everything it decoded before a cut or damage, as ``zcat`` does.

    ``gzip.GzipFile`` raises as soon as it meets the end of a truncated file or a corrupt
    block, dropping what it had decoded in that call (and a line reader's buffer with it).
    This one decodes with ``zlib`` (``wbits=31``; gzip members one after another), returns
    the decoded bytes first and raises on the read after (EOFError for a cut,
    ``BadGzipFile`` for damage), so the records before the cut are kept and the cut is
    counted once."""

    def __init__(self, raw: IO[bytes], chunk: int = 1 << 16):
        self._raw, self._chunk = raw, chunk
        self._z = zlib.decompressobj(31)
        self._out = b""
        self._error: BaseException | None = None
        self._done = self._started = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._out and self._error is None and not self._done:
            data = self._raw.read(self._chunk)
            if not data:
                if self._started and not self._z.eof:
                    self._error = EOFError("Compressed file ended before the end-of-stream marker was reached")
                else:
                    self._done = True
                return
            self._started = True
            try:
                while data:
                    if self._z.eof:  # the next gzip member
                        self._z = zlib.decompressobj(31)
                    self._out += self._z.decompress(data)
                    data = self._z.unused_data if self._z.eof else b""
            except zlib.error as e:
                self._error = gzip.BadGzipFile(f"corrupt gzip data: {e}")

    def readinto(self, buf) -> int:
        self._fill()
        if not self._out:
            if self._error is not None:
                err, self._error, self._done = self._error, None, True
                raise err
            return 0
        n = min(len(buf), len(self._out))
        buf[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _classify(exc: BaseException, gz: bool) -> str:
    if gz and isinstance(exc, (gzip.BadGzipFile, EOFError, zlib.error)):
        return "corrupt_gzip"
    return "unreadable"


def read_file(path: str, text_field: str = "text", max_doc_bytes: int = 8 << 20,
              max_binary_fraction: float = 0.1, name: str | None = None) -> Iterator[Document | Failure]:
    """Documents and failures of one file; never raises for bad content or I/O errors.

    ``name`` (default: the path) is what document ids are derived from (``relative_names``)."""
    fmt = detect_format(path) or "text"
    gz = path.lower().endswith(".gz")
    try:
        raw = storage.open_read(path, "rb")
    except Exception as e:  # noqa: BLE001 - any failure to open is counted, not fatal
        yield Failure("unreadable", path, 0, f"{type(e).__name__}: {e}")
        return
    try:
        if fmt == "jsonl":  # line by line: the records before a cut are kept
            stream = _TolerantGzip(raw) if gz else raw
            yield from _read_jsonl(stream, path, gz, text_field, max_doc_bytes, max_binary_fraction, name or path)
        else:  # one document: a cut one is a failure, not half a document
            stream = io.BufferedReader(_TolerantGzip(raw), 1 << 20) if gz else raw
            yield _read_whole(stream, path, gz, fmt, max_doc_bytes, max_binary_fraction, name or path)
    finally:
        try:
            raw.close()
        except Exception:  # noqa: BLE001 - closing a failed stream must not mask the count
            pass


def _check_bytes(data: bytes, source: str, max_binary_fraction: float) -> Failure | None:
    if not data.strip():
        return Failure("empty", source, len(data))
    frac = binary_fraction(data)
    if frac > max_binary_fraction:
        return Failure("binary", source, len(data), f"{frac:.0%} control/invalid bytes")
    if b"\x00" in data:
        return Failure("nul_byte", source, len(data), f"NUL at byte {data.index(0)}")
    return None


def _read_whole(stream: IO[bytes], path: str, gz: bool, fmt: str, max_doc_bytes: int,
                max_binary_fraction: float, name: str) -> Document | Failure:
    try:
        data = stream.read(max_doc_bytes + 1)
    except Exception as e:  # noqa: BLE001
        return Failure(_classify(e, gz), path, 0, f"{type(e).__name__}: {e}")
    if len(data) > max_doc_bytes:
        return Failure("too_large", path, len(data), f"over max_doc_bytes={max_doc_bytes}")
    bad = _check_bytes(data, path, max_binary_fraction)
    if bad:
        return bad
    text, replaced = decode_utf8(data)
    if fmt == "html":
        try:
            text = html_to_text(text)
        except Exception as e:  # noqa: BLE001 - html.parser is lenient; this is a last guard
            return Failure("invalid_html", path, len(data), f"{type(e).__name__}: {e}")
    return Document(doc_id(name, 0), path, text, len(data), replaced)


def _read_jsonl(stream: IO[bytes], path: str, gz: bool, text_field: str, max_doc_bytes: int,
                max_binary_fraction: float, name: str) -> Iterator[Document | Failure]:
    lineno, records = 0, 0
    try:
        head = stream.read(_SNIFF_BYTES)
        frac = binary_fraction(head)
        if frac > max_binary_fraction:
            yield Failure("binary", path, len(head), f"{frac:.0%} control/invalid bytes")
            return
        lines = io.BufferedReader(_Prefixed(head, stream), buffer_size=1 << 20)
        while True:
            line = lines.readline(max_doc_bytes + 1)
            if not line:
                break
            lineno += 1
            source = f"{path}:{lineno}"
            if len(line) > max_doc_bytes and not line.endswith(b"\n"):
                nbytes = len(line)
                while True:  # skip the rest of the over-long line without holding it
                    chunk = lines.readline(1 << 20)
                    nbytes += len(chunk)
                    if not chunk or chunk.endswith(b"\n"):
                        break
                records += 1
                yield Failure("too_large", source, nbytes, f"over max_doc_bytes={max_doc_bytes}")
                continue
            if not line.strip():
                continue  # a blank line separates nothing and holds no record
            records += 1
            yield _parse_json_line(line, name, lineno, source, text_field)
    except Exception as e:  # noqa: BLE001 - damage part-way: what was read stays counted
        records += 1
        yield Failure(_classify(e, gz), f"{path}:{lineno + 1}", 0, f"{type(e).__name__}: {e}")
        return
    if records == 0:
        yield Failure("empty", path, 0, "no JSONL records")


def _parse_json_line(line: bytes, name: str, lineno: int, source: str, text_field: str) -> Document | Failure:
    if b"\x00" in line:
        return Failure("nul_byte", source, len(line), f"NUL at byte {line.index(0)}")
    text, replaced = decode_utf8(line)
    try:
        obj = json.loads(text)
    except ValueError as e:
        return Failure("invalid_json", source, len(line), str(e))
    value = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        what = "not an object" if not isinstance(obj, dict) else (
            f"no field {text_field!r}" if text_field not in obj else f"{text_field!r} is not a string")
        return Failure("missing_text_field", source, len(line), what)
    return Document(doc_id(name, lineno), source, value, len(line), replaced)


# --- HTML -------------------------------------------------------------------------------

# Elements whose whole subtree is not page text.
_SKIP_TAGS = frozenset({"head", "script", "style", "noscript", "template", "nav", "header", "footer",
                        "form", "button", "select", "svg", "canvas", "iframe", "object"})
_SKIP_ROLES = frozenset({"navigation", "search", "banner", "contentinfo", "menu", "menubar", "toolbar"})
# Class names that common site generators give navigation and decoration (Sphinx, MkDocs...).
_SKIP_CLASSES = frozenset({"nav", "navbar", "menu", "sidebar", "sphinxsidebar", "related", "footer",
                           "header", "breadcrumbs", "headerlink", "mobile-nav", "toc"})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "param", "source", "track", "wbr"})
_BLOCK = frozenset({"p", "div", "br", "hr", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4",
                    "h5", "h6", "pre", "table", "tr", "section", "article", "main", "blockquote",
                    "figure", "figcaption", "caption", "body"})


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML page, skipping navigation, scripts and styles."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, whether it starts a skipped subtree)
        self.skipping = 0

    def _skip(self, tag: str, attrs) -> bool:
        if tag in _SKIP_TAGS:
            return True
        for k, v in attrs:
            if not v:
                continue
            if k == "role" and v in _SKIP_ROLES:
                return True
            if k == "class" and not _SKIP_CLASSES.isdisjoint(v.split()):
                return True
        return False

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag in ("br", "hr") and not self.skipping:
                self.parts.append("\n")
            return
        skip = self._skip(tag, attrs)
        self.stack.append((tag, skip))
        self.skipping += skip
        if tag in _BLOCK and not self.skipping:
            self.parts.append("\n")
        elif tag == "td" or tag == "th":
            self.parts.append(" ")

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr") and not self.skipping:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for _, skip in self.stack[i:]:
                    self.skipping -= skip
                del self.stack[i:]
                break
        else:
            return  # a stray end tag closes nothing
        if tag in _BLOCK and not self.skipping:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The visible text of a page, one block element per line (whitespace cleaned later)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)
