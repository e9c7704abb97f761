"""The run tier of the doc checks: every ``mtnlg`` command and Python block of README.md and
docs/ that can run on one machine is run, as written, in one workspace, in the order a reader
meets them (README first, then the step guides), so a doc whose commands stopped working
fails here.

The workspace holds what a reader has: the repository's ``data/corpus``, a ``notes.txt`` of
their own, and, under ``runs/local``, what ``mtnlg run --output runs/local`` leaves (that
command itself is tests/test_make_run.py: here its ``model`` is the one the README's commands
fuse). Commands run with the installed ``mtnlg`` in a subprocess; Python blocks of one file
run in one interpreter, one after another, as a reader pastes them. ``mtnlg serve`` starts a
real server (on a free port: ``8000`` in the file's later blocks is replaced by that port:
the newest server whose API key the block uses, else the newest one without a key), which
the blocks after it query; it stops with SIGTERM at the end of the file and must exit 0.

Not run, each with its reason in the report (``-rs``): a synopsis; a command that names a
bucket, a cluster or a remote server (``gs://``, ``s3://``, ``http(s)://``, ``mtnlg submit``,
``mtnlg job --submit``: the parse tier, tests/test_docs.py, builds and checks its whole
configuration, and test_pipeline, test_submit and test_cluster_jobs compile and dry-run
them); a block marked ``<!-- not run: REASON -->`` (a sketch with ``...`` in it, or a quote of
other code). A command shown with an error after it must exit 2 with that error line."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from doc_blocks import ROOT, Snippet, commands, exports, is_synopsis, snippets, split_words

pytestmark = [pytest.mark.e2e, pytest.mark.docs]

# The order a reader meets the files: what a later file uses, an earlier one made.
ORDER = ["README.md", "docs/tokenize.md", "docs/extract.md", "docs/train.md", "docs/fuse.md",
         "docs/evaluate.md", "docs/generate.md", "docs/serve.md", "docs/plan.md", "docs/model.md",
         "docs/kubeflow.md", "docs/architecture.md"]
REMOTE = re.compile(r"\b(gs|s3|https?)://")
BIN = Path(sys.executable).parent
TIMEOUT_S = 240
SCHEMAS = ROOT.parent / "shared" / "schemas"


def test_every_doc_is_in_the_run_order():
    found = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")} | {"README.md"}
    assert found - {"docs/performance.md"} <= set(ORDER), sorted(found - set(ORDER))


def why_not_run(words: list[str], snippet: Snippet) -> str:
    """Why a documented command does not run here ("" when it does)."""
    if snippet.not_run:
        return snippet.not_run
    if is_synopsis(words):
        return "a synopsis"
    if words[0] == "run":
        return "the whole pipeline: tests/test_make_run.py runs `mtnlg run --output ...`"
    if words[0] == "submit" or (words[0] == "job" and "--submit" in words):
        return "needs a Kubeflow or Kubernetes API server (the parse tier checks its configuration)"
    if words[0] in ("job", "compile"):
        return ""   # writes the objects or the pipeline into a file, bucket names and all
    if any(REMOTE.search(w) for w in words):
        return "names a bucket or a remote server (the parse tier checks its configuration)"
    return ""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("reader")
    (ws / "data").mkdir()
    (ws / "data" / "corpus").symlink_to(ROOT / "data" / "corpus")
    with gzip.open(ROOT / "data/corpus/python-docs/whatsnew/2.0.txt.gz", "rt", encoding="utf-8") as f:
        (ws / "notes.txt").write_text(f.read()[:40000], encoding="utf-8")
    if SCHEMAS.is_dir():
        (ws / "crds").symlink_to(SCHEMAS)   # the operators' CRDs, as docs/kubeflow.md fetches them
    (ws / "runs" / "local").mkdir(parents=True)
    (ws / "runs" / "local" / "model").symlink_to(ws / "out" / "model")   # what `mtnlg run` leaves
    return ws


class Reader:
    """Runs one file's blocks in order, in the workspace; collects what failed."""

    def __init__(self, ws: Path, file: str):
        self.ws, self.file = ws, file
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "HF_HUB_OFFLINE": "1", "MTNLG_LOG_LEVEL": "WARNING"}
        self.failures: list[str] = []
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.servers: list[tuple[str, subprocess.Popen]] = []
        self.ports: list[tuple[int, str]] = []   # (port, its API key or "") of each server started
        self.python: subprocess.Popen | None = None

    def fail(self, where: str, what: str, output: str = "") -> None:
        tail = "\n".join(output.strip().splitlines()[-15:])
        self.failures.append(f"{where}: {what}\n{textwrap.indent(tail, '    ')}")

    # -- shell ------------------------------------------------------------------------------
    def command(self, where: str, command: str, shown: str, env: dict[str, str]) -> None:
        words = split_words(command)
        if words[0] == "serve":
            return self.serve(where, words, env)
        argv = ["mtnlg", *words]
        started = time.monotonic()
        try:
            p = subprocess.run(argv, cwd=self.ws, env={**self.env, **env}, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            return self.fail(where, f"{command!r} ran past {TIMEOUT_S} s", (e.stdout or "") + (e.stderr or ""))
        self.ran.append(f"{where} ({time.monotonic() - started:.1f} s)")
        error = re.search(r"^(mtnlg \w+: (?:configuration )?error: .*)$", shown, re.M)
        if error:
            if p.returncode != 2 or error.group(1) not in p.stderr:
                self.fail(where, f"{command!r}: expected exit 2 and {error.group(1)!r}, got {p.returncode}",
                          p.stderr)
        elif p.returncode != 0:
            self.fail(where, f"{command!r} exited {p.returncode}", p.stdout + p.stderr)

    def serve(self, where: str, words: list[str], env: dict[str, str]) -> None:
        """Start the documented server on a free port; it answers /health before the next block."""
        port = free_port()
        if "--port" in words:
            words[words.index("--port") + 1] = str(port)
        else:
            words += ["--port", str(port)]
        key = env.get("MTNLG_API_KEY") or (words[words.index("--api-key") + 1] if "--api-key" in words else "")
        self.ports.append((port, key))
        log = open(self.ws / f"serve-{port}.log", "w+")
        p = subprocess.Popen(["mtnlg", *words], cwd=self.ws, env={**self.env, **env}, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append((where, p))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if p.poll() is not None:
                log.seek(0)
                return self.fail(where, f"the server exited {p.returncode} at start", log.read())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        self.ran.append(where)
                        return
            except OSError:
                time.sleep(0.3)
        self.fail(where, "the server did not answer /health in 120 s")

    def stop_servers(self) -> None:
        for where, p in self.servers:
            if p.poll() is not None:
                continue   # it stopped at start: said already
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.returncode != 0:
                self.fail(where, f"the server exited {p.returncode} on SIGTERM")

    # -- python -----------------------------------------------------------------------------
    def block(self, s: Snippet) -> None:
        text = s.text
        # the server the block talks to: the newest one whose API key it uses, else the newest without one
        ports = [p for p, key in self.ports if key and key in text] or [p for p, key in self.ports if not key]
        if ports:
            text = text.replace("127.0.0.1:8000", f"127.0.0.1:{ports[-1]}")
        if self.python is None:
            self.python = subprocess.Popen([sys.executable, "-c", SESSION], cwd=self.ws, env=self.env,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
        started = time.monotonic()
        self.python.stdin.write(json.dumps({"where": s.where, "text": text}) + "\n")
        self.python.stdin.flush()
        output = []
        for line in self.python.stdout:
            if line.startswith(DONE):
                result = json.loads(line[len(DONE):])
                break
            output.append(line)
        else:
            return self.fail(s.where, "the interpreter exited", "".join(output))
        self.ran.append(f"{s.where} ({time.monotonic() - started:.1f} s)")
        if result["error"]:
            self.fail(s.where, "the block raised", "".join(output) + result["error"])

    def close(self) -> None:
        self.stop_servers()
        if self.python is not None:
            self.python.stdin.close()
            self.python.wait(timeout=60)


DONE = "\x00done "
# One reader's interpreter: blocks arrive one JSON line each on stdin, run in one namespace
# (a block may use what an earlier block of the file defined), with an empty stdin of their own
# (an interactive chat ends at once), and a line starting with DONE after each.
SESSION = textwrap.dedent(f"""
    import io, json, sys, traceback
    blocks, ns = sys.stdin, {{"__name__": "__main__"}}
    for line in blocks:
        block = json.loads(line)
        sys.stdin = io.StringIO("")
        error = ""
        try:
            exec(compile(block["text"], block["where"], "exec"), ns)
        except BaseException:
            error = traceback.format_exc()
        sys.stdin = blocks
        print(flush=True)
        print({DONE!r} + json.dumps({{"error": error}}), flush=True)
""")


def plan(file: str) -> list[tuple[str, object]]:
    """What a reader of ``file`` runs, in order: ("sh", (where, command, shown, env)),
    ("python", snippet) or ("skip", (where, reason))."""
    steps: list[tuple[str, object]] = []
    for s in snippets([ROOT / file]):
        if s.lang == "python":
            steps.append(("skip", (s.where, s.not_run)) if s.not_run else ("python", s))
            continue
        for line, command, shown in commands(s):
            where = f"{s.file}:{line}"
            reason = why_not_run(split_words(command), s)
            steps.append(("skip", (where, reason)) if reason else ("sh", (where, command, shown, exports(s))))
    return steps


@pytest.mark.parametrize("file", ORDER)
def test_the_doc_runs_as_written(file, workspace):
    reader = Reader(workspace, file)
    try:
        for kind, step in plan(file):
            if kind == "sh":
                reader.command(*step)
            elif kind == "python":
                reader.block(step)
            else:
                reader.skipped.append(f"{step[0]}: {step[1]}")
    finally:
        reader.close()
    print(f"{file}: ran {len(reader.ran)}: {', '.join(reader.ran)}; not run {len(reader.skipped)}:\n  "
          + "\n  ".join(reader.skipped))
    assert not reader.failures, f"{file}: " + "\n".join(reader.failures)


def test_most_of_what_the_docs_show_runs():
    """The run tier covers the docs: every subcommand a reader runs locally is run somewhere,
    and what is skipped is a small part, each with a reason."""
    ran, skipped = set(), 0
    for file in ORDER:
        for kind, step in plan(file):
            if kind == "sh":
                ran.add(split_words(step[1])[0])
            elif kind == "skip":
                assert step[1], step
                skipped += 1
    assert {"extract", "tokenize", "train", "fuse", "verify", "evaluate", "generate", "serve", "plan",
            "reshard", "compile", "job"} <= ran, ran
    python = [s for f in ORDER for s in snippets([ROOT / f]) if s.lang == "python"]
    assert sum(not s.not_run for s in python) >= 10, [s.where for s in python if s.not_run]


def test_a_stale_doc_would_fail(tmp_path):
    """The run tier fails on what a parse cannot see: a path that is not there, a block that
    raises, a shown error that is not the one the command gives."""
    reader = Reader(tmp_path, "x.md")
    reader.command("x.md:1", "mtnlg verify out/nothing-here", "", {})
    reader.command("x.md:2", "mtnlg train --recipe debug train.setps=1",
                   "mtnlg train: configuration error: unknown key 'train.stesp'\n", {})
    reader.block(Snippet("x.md:3", "python", "import json\njson.loads('{')\n", ""))
    reader.block(Snippet("x.md:4", "python", "x = 1\n", ""))
    reader.block(Snippet("x.md:5", "python", "assert x == 1\n", ""))
    reader.close()
    assert [f.split(":", 2)[1] for f in reader.failures] == ["1", "2", "3"], reader.failures
    assert "JSONDecodeError" in reader.failures[2]
