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


# ---- remote checkpoints: ranged reads in place ----------------------------------------

def _remote_run(root: str, steps=(1, 2)):
    model, opt = _model_and_optimizer(0)
    paths = []
    for s in steps:
        _step(model, opt)
        paths.append(ckpt.save_checkpoint(f"{root}/run/checkpoints", s, model, opt, {"consumed_samples": 2 * s},
                                          config_text="a: 1\n"))
    return model, opt, paths


def _record_ranges(monkeypatch) -> list:
    """Every ranged read of the checkpoint loader: (file name, start, length)."""
    from mtnlg import storage

    calls: list = []
    real = storage.open_ranged

    class Counting:
        def __init__(self, uri):
            self.f, self.uri = real(uri), uri

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, pos):
            self.pos = pos
            return self.f.seek(pos)

        def read(self, n):
            calls.append((self.uri.rsplit("/", 1)[-1], self.pos, n))
            return self.f.read(n)

    monkeypatch.setattr(storage, "open_ranged", Counting)
    return calls


def test_a_remote_checkpoint_loads_in_place_with_ranged_reads(s3, monkeypatch, tmp_path):
    from mtnlg import storage

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where a node-local copy would be staged
    model, opt, (_, p2) = _remote_run(s3)
    saved = [t.clone() for t in model.state_dict().values()]
    expected = _step(model, opt)
    sizes = storage.file_sizes(p2)
    calls = _record_ranges(monkeypatch)
    # the whole state: one request per file for its entries, the file hashed as it streams
    other, other_opt = _model_and_optimizer(1)
    ckpt.load_checkpoint(p2, other, other_opt)
    assert calls == [("__0_0.distcp", 0, sizes["__0_0.distcp"])]
    assert all(torch.equal(a, b) for a, b in zip(saved, other.state_dict().values()))
    assert _step(other, other_opt) == expected  # weights, moments and RNG restored
    assert os.listdir(tmp_path) == []  # nothing staged on local disk
    # the model alone: only the model entries' bytes, not the optimizer state around them
    calls.clear()
    fresh = _model_and_optimizer(2)[0]
    ckpt.load_checkpoint(p2, fresh, None)
    read = sum(n for _, _, n in calls)
    params = sum(t.numel() * t.element_size() for t in fresh.state_dict().values())
    assert params <= read < 0.5 * sizes["__0_0.distcp"], (read, params, sizes["__0_0.distcp"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), saved))


def _flip_remote(uri: str, offset: int = 100) -> None:
    from mtnlg import storage

    raw = bytearray(storage.read_bytes(uri))
    raw[offset] ^= 0xFF
    storage.write_bytes(uri, bytes(raw))


def test_a_remote_shard_altered_in_place_fails_its_hash_while_loading(gcs, caplog):
    from mtnlg.train.checkpointer import Checkpointer
    from mtnlg.config import load_config
    from mtnlg.train.config import TrainRunConfig, recipe
    from mtnlg.train.state import TrainState

    model, opt, (p1, p2) = _remote_run(gcs)
    _flip_remote(f"{p2}/__0_0.distcp")  # same size: only the content hash can tell
    # the check before loading reads sizes (and hashes the small shared files) ...
    assert ckpt.verify_checkpoint(p2, shards="size") == []
    assert ckpt.latest_good(f"{gcs}/run/checkpoints") == p2
    # ... the shard file read whole while loading is hashed, and the load refused
    with pytest.raises(ckpt.CheckpointDamaged, match=r"__0_0\.distcp: sha256 mismatch"):
        ckpt.load_checkpoint(p2, *_model_and_optimizer(1))
    assert ckpt.verify_checkpoint(p2) == ["__0_0.distcp: sha256 mismatch (the file's content changed "
                                          "after it was written)"]  # `mtnlg verify`: hashed in place
    # resuming with checkpoint.load=auto falls back to the newest checkpoint that loads
    cfg = load_config(TrainRunConfig, None, ["data.path=/d", f"output={gcs}/run", "checkpoint.load=auto"],
                      base=recipe("debug"))
    other, other_opt = _model_and_optimizer(1)
    ck = Checkpointer(cfg, other, other_opt, TrainState(), None, False, {}, verbose=False)
    ck.maybe_resume()
    assert ck.resumed_from == p1 and ck.state.step == 1
    assert "trying an older checkpoint" in caplog.text
    _flip_remote(f"{p2}/rng/rank_00000.pt", offset=10)  # a rank's own RNG file: hashed by that rank
    _flip_remote(f"{p1}/__0_0.distcp")
    with pytest.raises(ckpt.CheckpointDamaged, match="no intact checkpoint"):
        Checkpointer(cfg, other, other_opt, TrainState(), None, False, {}, verbose=False).maybe_resume()


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_a_remote_rng_file_altered_in_place_fails_its_hash_while_loading(store, request):
    """The shards intact, only a rank's RNG file changed, inside the generator state: the
    file still unpickles, so only the rank's own hash of it can refuse the checkpoint."""
    import io

    from mtnlg import storage

    _, _, (_, p2) = _remote_run(request.getfixturevalue(store))
    rng = f"{p2}/rng/rank_00000.pt"
    raw = storage.read_bytes(rng)
    _flip_remote(rng, offset=len(raw) // 2)  # the middle of the torch generator's 5056 state bytes
    damaged = torch.load(io.BytesIO(storage.read_bytes(rng)), weights_only=True)
    saved = torch.load(io.BytesIO(raw), weights_only=True)
    assert not torch.equal(damaged["torch"], saved["torch"])  # it loads, with another state
    assert ckpt.verify_checkpoint(p2, shards="size") == []    # same size: the pre-load check passes
    other, other_opt = _model_and_optimizer(1)
    before = torch.get_rng_state()
    with pytest.raises(ckpt.CheckpointDamaged) as e:
        ckpt.load_checkpoint(p2, other, other_opt)
    assert str(e.value) == (f"checkpoint {p2} is damaged: rng/rank_00000.pt: sha256 mismatch "
                            "(the file's content changed after it was written)")
    assert torch.equal(torch.get_rng_state(), before)        # the damaged state was not restored
    assert ckpt.verify_checkpoint(p2) == ["rng/rank_00000.pt: sha256 mismatch (the file's content changed "
                                          "after it was written)"]
