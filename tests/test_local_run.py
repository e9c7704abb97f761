"""The whole pipeline through kfp.local, as `make run` runs it, on a slice of the bundled corpus."""

import json
import shutil
from pathlib import Path

import pytest

from mtnlg.cli import main as cli

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "python-docs"


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    for sub in ("tutorial", "faq"):
        shutil.copytree(CORPUS / sub, corpus / sub)
    out = root / "out"
    rc = cli(["run", "--output", str(out), "--input", str(corpus), "--workers", "1",
              "--tokenize", "vocab_size=512",
              "--train", "train.steps=8", "--train", "train.eval_every=4", "--train", "checkpoint.every=4"])
    assert rc == 0
    return json.loads((out / "outputs.json").read_text())["outputs"]


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
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) >= 2 and all(l == l for l in losses)  # no NaN
