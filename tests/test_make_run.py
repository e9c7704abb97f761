"""`make run` as a fresh clone runs it (the whole bundled corpus, the `local` recipe, every
step through kfp.local), and the README's figures: what the run prints must be what the
README quotes, line for line, so the README cannot go stale: each figure to within a unit of
its last digit, and of the sampled continuations the prompts (both follow the CPU's float
kernels).
Also: every step's outputs are there, training used 2-way tensor parallelism, and the
samples are real text of 20+ tokens."""

import json
import math
import re
from pathlib import Path

import pytest

from mtnlg.cli import main as cli

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- make-run-output -->", "<!-- /make-run-output -->"


def readme_block() -> list[str]:
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"README.md lost its {BEGIN} block"
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    lines = [ln for ln in block.strip().splitlines() if not ln.startswith("```")]
    assert lines and lines[0] == "Evaluation:"
    return lines


@pytest.fixture(scope="module")
def make_run(tmp_path_factory, capsys_module):
    out = tmp_path_factory.mktemp("make-run") / "runs-local"
    assert cli(["run", "--output", str(out)]) == 0
    printed = capsys_module()
    record = json.loads((out / "outputs.json").read_text())
    assert record["status"] == "SUCCEEDED"
    return printed, record["outputs"]


@pytest.fixture(scope="module")
def capsys_module():
    """stdout of the module's run (pytest's capsys is per test)."""
    import contextlib
    import io
    import sys

    buf = io.StringIO()
    old = sys.stdout

    class Tee(io.TextIOBase):
        def write(self, s):
            buf.write(s)
            return old.write(s)

        def flush(self):
            old.flush()

    sys.stdout = Tee()
    try:
        yield lambda: buf.getvalue()
    finally:
        sys.stdout = old
        with contextlib.suppress(Exception):
            buf.close()


def test_make_run_prints_the_readme_figures(make_run):
    printed, _ = make_run
    want = readme_block()
    start = printed.index("Evaluation:")
    got = printed[start:].splitlines()[:len(want)]
    message = "README.md's make-run block differs from what `mtnlg run` prints:\n" + "\n".join(got)
    # The run is deterministic on one machine, but its floats follow the CPU's kernels: on
    # another CPU (an AMD EPYC, 2026-12-02) a confidence bound printed 5.062 for 5.061 and 2
    # of the 5 sampled continuations differed. So each figure must agree to within one unit
    # of its last printed digit (integers exactly), the words around them exactly, and of the
    # samples the prompts and their number.
    cut = next(i for i, ln in enumerate(want) if ln.startswith("Samples ("))
    assert len(got) == len(want) and got[cut] == want[cut], message
    number = re.compile(r"\d+(?:\.\d+)?")
    for g, w in zip(got[:cut], want[:cut]):
        assert number.sub("#", g) == number.sub("#", w), message
        for a, b in zip(number.findall(g), number.findall(w)):
            unit = 10.0 ** -len(b.split(".")[1]) if "." in b else 0.0
            assert abs(float(a) - float(b)) <= unit * 1.01, f"{g!r} is not {w!r}\n" + message
    prompt = re.compile(r"\s*\[[^\]]*\]")
    assert [prompt.match(ln).group() for ln in got[cut + 1:]] == [prompt.match(ln).group() for ln in want[cut + 1:]], \
        message


def test_make_run_samples_are_real_text(make_run):
    _, outputs = make_run
    from mtnlg.formats.tokenizer import Tokenizer

    m = json.loads((Path(outputs["evaluate"]["report.d"]) / "metrics.json").read_text())
    tok = Tokenizer.from_dir(outputs["tokenize"]["tokens"])
    assert len(m["samples"]) == 5
    for s in m["samples"]:
        ids = tok.encode(s["completion"])
        assert len(ids) >= 20, s                                     # a continuation, not a "."
        words = re.findall(r"[A-Za-z]{3,}", s["completion"])
        assert len(words) >= 3, s                                    # in the corpus's own words
    # the recipe as the issue set it: 2-way tensor parallel, ppl clearly under the old 270.7
    assert m["val_perplexity"] < 240 and m["val_bits_per_byte"] < 2.659
    assert m["cloze_items"] >= 400


def test_every_step_produced_its_outputs(make_run):
    _, outs = make_run
    assert set(outs) == {"extract", "tokenize", "train", "fuse", "evaluate"}
    extracted = Path(outs["extract"]["dataset"])
    stats = json.loads((extracted / "stats.json").read_text())
    assert stats["read"] > 0 and stats["kept"] > 0
    assert list((extracted / "train").glob("*.jsonl"))
    tokens = Path(outs["tokenize"]["tokens"])
    for split in ("train", "validation"):
        assert (tokens / f"{split}.bin").stat().st_size > 0
        assert (tokens / f"{split}.idx").read_bytes()[:9] == b"MMIDIDX\x00\x00"
    run = Path(outs["train"]["checkpoint"])
    assert json.loads((run / "summary.json").read_text())["steps"] == 280
    assert (Path(outs["fuse"]["model"]) / "model.safetensors").exists()
    assert Path(outs["evaluate"]["report"]).stat().st_size > 0


def sharding(checkpoint: str) -> tuple[list[str], dict[str, tuple[int, set[int]]]]:
    """The shard files of a DCP checkpoint and, for each model tensor, how its ranks held it,
    as DCP's .metadata records it: (chunks, the dimensions the chunks cut)."""
    from mtnlg.formats.dcp_reader import CheckpointReader

    with CheckpointReader(checkpoint) as reader:
        layout = {fqn.removeprefix("model."): (len(md.chunks),
                                               {d for c in md.chunks for d, o in enumerate(c.offsets) if o})
                  for fqn, md in reader.entries().items() if fqn.startswith("model.") and hasattr(md, "chunks")}
        return reader.files(), layout


def test_training_used_two_way_tensor_parallelism(make_run):
    from mtnlg.formats.checkpoint import resolve_checkpoint

    run = Path(make_run[1]["train"]["checkpoint"])
    files, layout = sharding(resolve_checkpoint(str(run)))
    assert files == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote shards
    column = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "mlp.w_up.weight",
              "mlp.w_gate.weight")
    row = ("attention.wo.weight", "mlp.w_down.weight")
    want = {"tok_embeddings.weight": (2, {0}), "output.weight": (2, {0}), "norm.weight": (1, set())}
    for i in range(4):
        want |= {f"layers.{i}.{n}": (2, {0}) for n in column} | {f"layers.{i}.{n}": (2, {1}) for n in row}
        want |= {f"layers.{i}.{n}": (1, set()) for n in ("attention_norm.weight", "mlp_norm.weight")}
    assert layout == want  # halves: column-parallel by rows, row-parallel by columns, vocabulary by rows
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    # a non-finite loss is logged as null: every logged step must have a finite number
    assert len(losses) >= 2 and all(isinstance(v, float) and math.isfinite(v) for v in losses), losses
