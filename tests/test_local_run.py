"""The whole pipeline through kfp.local, as `make run` runs it, on a slice of the bundled corpus."""

import json
import math
import shutil
from pathlib import Path

import pytest

from mtnlg.cli import main as cli

pytestmark = pytest.mark.e2e

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "python-docs"


def _run(root: Path, name: str) -> dict:
    corpus = root / "corpus"
    if not corpus.exists():
        for sub in ("tutorial", "faq"):
            shutil.copytree(CORPUS / sub, corpus / sub)
    out = root / name
    rc = cli(["run", "--output", str(out), "--input", str(corpus), "--workers", "1",
              "--tokenize", "vocab_size=512",
              "--train", "train.steps=8", "--train", "train.eval_every=4", "--train", "checkpoint.every=4",
              "--evaluate", "max_new_tokens=8"])
    assert rc == 0
    record = json.loads((out / "outputs.json").read_text())
    assert record["status"] == "SUCCEEDED" and record["error"] is None
    return record["outputs"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    # One run: that a run is deterministic is checked by tests/test_make_run.py, whose full
    # `make run` must print exactly the figures README.md recorded from an earlier run.
    return _run(tmp_path_factory.mktemp("run"), "first")


def test_every_step_produced_its_outputs(pipeline_run):
    outs = pipeline_run
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
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8
    assert (Path(outs["fuse"]["model"]) / "model.safetensors").exists() or \
        list(Path(outs["fuse"]["model"]).glob("model-*.safetensors"))
    assert Path(outs["evaluate"]["report"]).stat().st_size > 0


def test_training_used_two_way_tensor_parallelism(pipeline_run):
    import yaml

    run = Path(pipeline_run["train"]["checkpoint"])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["parallel"]["tp"] == 2
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    # a non-finite loss is logged as null: every logged step must have a finite number
    assert len(losses) >= 2 and all(isinstance(v, float) and math.isfinite(v) for v in losses), losses
