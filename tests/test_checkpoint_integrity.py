"""Checkpoint integrity: per-file checksums written with every checkpoint and verified on
load; a damaged newest checkpoint is skipped when resuming from ``latest``/``auto``, an
explicitly named one is an error; ``mtnlg verify`` says what is wrong."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from test_checkpoint import _model_and_optimizer, _step

from mtnlg.cli import main as cli
from mtnlg.formats import checkpoint as ckpt

pytestmark = pytest.mark.unit


def _run(tmp_path, steps=(1, 2)):
    model, opt = _model_and_optimizer(0)
    paths = []
    for s in steps:
        _step(model, opt)
        paths.append(ckpt.save_checkpoint(str(tmp_path), s, model, opt, {"consumed_samples": 2 * s},
                                          config_text="a: 1\n"))
    return model, opt, paths


def _flip(path, offset=100):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(2)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def test_checksums_are_written_and_verify(tmp_path):
    _, _, (p1, p2) = _run(tmp_path)
    sums = json.loads((tmp_path / "step_00000002" / "checksums" / "rank_00000.json").read_text())
    assert {"__0_0.distcp", ".metadata", "rng/rank_00000.pt"} <= set(sums)
    side = json.loads((tmp_path / "step_00000002" / "checksums" / "rank_00000-side.json").read_text())
    assert "config.yaml" in side
    assert ckpt.verify_checkpoint(p2) == []


@pytest.mark.parametrize("damage, match", [
    ("flip", "__0_0.distcp: sha256 mismatch"),
    ("truncate", "__0_0.distcp: .* bytes, expected"),
    ("delete", "__0_0.distcp: missing"),
    ("metadata", ".metadata: sha256 mismatch"),
    ("config", "config.yaml: .* bytes, expected"),
])
def test_damage_is_named_and_loading_it_explicitly_fails(tmp_path, damage, match):
    _, _, (_, p2) = _run(tmp_path)
    shard = os.path.join(p2, "__0_0.distcp")
    if damage == "flip":
        _flip(shard)
    elif damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)
    elif damage == "delete":
        os.remove(shard)
    elif damage == "metadata":
        _flip(os.path.join(p2, ".metadata"), 10)
    else:
        with open(os.path.join(p2, "config.yaml"), "a") as f:
            f.write("b: 2\n")
    problems = ckpt.verify_checkpoint(p2)
    assert problems and any(re.search(match, p) for p in problems), problems
    other, other_opt = _model_and_optimizer(1)
    before = [t.clone() for t in other.parameters()]
    with pytest.raises(ckpt.CheckpointDamaged, match=f"checkpoint {p2} is damaged"):
        ckpt.load_checkpoint(p2, other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # nothing was loaded


def test_resume_skips_a_damaged_latest_for_the_newest_intact(tmp_path, caplog):
    model, opt, (p1, p2) = _run(tmp_path)
    _flip(os.path.join(p2, "__0_0.distcp"))
    assert ckpt.read_latest(str(tmp_path)) == p2
    assert ckpt.latest_good(str(tmp_path)) == p1                 # step 1, intact
    meta = ckpt.load_checkpoint(p1, *_model_and_optimizer(1))
    assert meta["step"] == 1
    _flip(os.path.join(p1, "__0_0.distcp"))
    with pytest.raises(ckpt.CheckpointDamaged, match="no intact checkpoint"):
        ckpt.latest_good(str(tmp_path))
    assert ckpt.latest_good(str(tmp_path / "empty")) is None


def test_an_interrupted_newest_checkpoint_is_skipped_too(tmp_path):
    _, _, (p1, p2) = _run(tmp_path)
    os.remove(os.path.join(p2, "trainer_state.json"))            # killed before it completed
    assert ckpt.latest_good(str(tmp_path)) == p1


def test_checksum_names_cannot_leave_the_checkpoint(tmp_path):
    _, _, (_, p2) = _run(tmp_path)
    f = os.path.join(p2, "checksums", "rank_00000.json")
    sums = json.loads(open(f).read())
    sums["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    with open(f, "w") as fh:
        json.dump(sums, fh)
    assert any("would leave the checkpoint directory" in p for p in ckpt.verify_checkpoint(p2))


def test_mtnlg_verify(tmp_path, capsys):
    _, _, (p1, p2) = _run(tmp_path)
    assert cli(["verify", p2]) == 0 and "OK" in capsys.readouterr().out
    _flip(os.path.join(p2, "__0_0.distcp"))
    assert cli(["verify", p2]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "__0_0.distcp: sha256 mismatch" in out
    assert cli(["verify", str(tmp_path)]) == 0                   # the run: a resume still finds step 1
    out = capsys.readouterr().out
    assert f"a resume would use {p1}" in out and "not intact" in out
    assert cli(["verify", str(tmp_path / "nothing")]) == 1
