"""`mtnlg run`'s flags reach the pipeline: inputs, workers and each step's overrides (after
the local defaults, so that they win). The whole run itself is tests/test_make_run.py."""

import json

import pytest

from mtnlg.cli import main as cli

pytestmark = pytest.mark.e2e


def test_run_flags_reach_the_pipeline(tmp_path, monkeypatch):
    import mtnlg.pipelines.gpt as gpt

    seen = {}
    monkeypatch.setattr(gpt, "gpt_pipeline", lambda **kw: seen.update(kw))
    (tmp_path / "corpus").mkdir()
    out = tmp_path / "out"
    (out / "pipeline_root").mkdir(parents=True)
    rc = cli(["run", "--output", str(out), "--input", str(tmp_path / "corpus"), "--workers", "1", "--nproc", "3",
              "--recipe", "debug", "--extract", "min_words=5", "--tokenize", "vocab_size=512",
              "--train", "train.steps=8", "--fuse", "dtype=bf16", "--evaluate", "max_new_tokens=8"])
    assert rc == 0
    assert seen["inputs"] == [str(tmp_path / "corpus")] and seen["extract_workers"] == 1 and seen["nproc"] == 3
    assert seen["recipe"] == "debug"
    assert seen["extract_overrides"] == ["validation_fraction=0.05", "min_words=5"]
    assert seen["tokenize_overrides"] == ["vocab_size=4096", "vocab_size=512"]
    assert seen["train_overrides"] == ["parallel.tp=2", "train.steps=8"]
    assert seen["fuse_overrides"] == ["dtype=bf16"] and seen["evaluate_overrides"] == ["max_new_tokens=8"]
    record = json.loads((out / "outputs.json").read_text())
    assert record["status"] == "SUCCEEDED" and record["error"] is None
