"""The code blocks of README.md and docs/: what tests/test_docs.py checks and
tests/test_docs_run.py runs.

A block can carry a mark on the line just above its opening fence:
``<!-- not run: REASON -->`` (a sketch with ``...`` in it, a quote of other code, or a call
that needs a cluster); the parse tier still checks it, and the run tier says why it skipped
it."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Snippet:
    where: str     # file:line of the opening fence
    lang: str
    text: str
    not_run: str   # the reason of a "not run" mark, "" when the block runs

    def __str__(self) -> str:
        return self.where

    @property
    def file(self) -> str:
        return self.where.rsplit(":", 1)[0]


def snippets(docs: list[Path] | None = None) -> list[Snippet]:
    out = []
    for path in docs or DOCS:
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            line = text[:m.start()].count("\n") + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = NOT_RUN.search(before)
            out.append(Snippet(f"{path.relative_to(ROOT)}:{line}", m.group(1), m.group(2),
                               mark.group(1) if mark else ""))
    return out


def commands(s: Snippet) -> list[tuple[int, str, str]]:
    """The ``mtnlg`` command lines of a shell block: (line in the file, command, the output
    shown after a ``$ `` prompted command, up to the next prompt)."""
    if s.lang not in ("", "sh", "bash"):
        return []
    out: list[list] = []
    cur, start, prompted = "", 0, False
    base = int(s.where.rsplit(":", 1)[1])
    with_prompts = any(line.startswith("$ ") for line in s.text.splitlines())
    for i, raw in enumerate(s.text.splitlines(), 1):
        line = raw.strip()
        if not cur:
            start = base + i
            prompted = line.startswith("$ ")
            line = line[2:] if prompted else line
            if not line.startswith("mtnlg ") or (with_prompts and not prompted):
                if out and out[-1][3]:
                    out[-1][2] += raw + "\n"   # the shown output of the prompted command
                continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append([start, cur + line, "", prompted])
        cur = ""
    return [(line, cmd, shown) for line, cmd, shown, _ in out]


def exports(s: Snippet) -> dict[str, str]:
    """``export NAME=VALUE`` lines of a shell block (the environment its commands run in)."""
    out = {}
    for line in s.text.splitlines():
        words = shlex.split(line, comments=True) if line.strip().startswith("export ") else []
        for w in words[1:]:
            if "=" in w:
                k, v = w.split("=", 1)
                out[k] = v
    return out


def split_words(command: str) -> list[str]:
    """The words after ``mtnlg`` (shell quoting and ``#`` comments as a shell reads them)."""
    return shlex.split(command, comments=True)[1:]


def is_synopsis(words: list[str]) -> bool:
    return any(w.startswith("[") and (w.endswith("]") or "--" in w) or w.endswith("...") or w == "..."
               for w in words) or any(w.isupper() and len(w) > 2 for w in words[1:2])
