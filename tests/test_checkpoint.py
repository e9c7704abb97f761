"""Checkpoints (torch.distributed.checkpoint) in one process: exact round trip, atomic
commit with ``latest``, keep-last-K pruning, gs:// and s3:// storage, refusal of unsafe pickles.
Multi-process save/resume through the trainer is in test_train.py."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from mtnlg import storage
from mtnlg.formats import checkpoint as ckpt
from mtnlg.formats.rundir import TOKENIZER_META
from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT
from mtnlg.train.optim import build_optimizer

pytestmark = pytest.mark.unit

CFG = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_length=16, vocab_size=64, dropout=0.2)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = GPT(CFG)
    return model, build_optimizer(model, 1e-2, (0.9, 0.95), 1e-8, 0.1)


def _step(model, opt) -> float:
    """One training step on random tokens (draws from the RNG: data and dropout)."""
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_length + 1))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_save_then_load_continues_bitwise(tmp_path):
    model, opt = _model_and_optimizer(0)
    for _ in range(2):
        _step(model, opt)
    path = ckpt.save_checkpoint(str(tmp_path), 2, model, opt, {"consumed_samples": 4}, config_text="a: 1\n",
                                extra_files={"tokenizer.json": _write(tmp_path / "tok.json", '{"vocab_size": 64}')})
    assert path == str(tmp_path / "step_00000002")
    expected = [_step(model, opt) for _ in range(3)]

    other, other_opt = _model_and_optimizer(1)  # different weights and RNG until loaded
    meta = ckpt.load_checkpoint(ckpt.resolve_checkpoint(str(tmp_path)), other, other_opt)
    assert meta["step"] == 2 and meta["consumed_samples"] == 4 and meta["world_size"] == 1
    got = [_step(other, other_opt) for _ in range(3)]
    assert got == expected  # bitwise: weights, Adam moments and step, RNG (dropout, data)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    assert (tmp_path / "step_00000002" / "config.yaml").read_text() == "a: 1\n"
    assert json.loads((tmp_path / "step_00000002" / TOKENIZER_META).read_text()) == {"vocab_size": 64}
    assert sorted(os.listdir(tmp_path / "step_00000002" / "rng")) == ["rank_00000.pt"]


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_latest_pointer_and_keep_last_pruning(tmp_path):
    model, opt = _model_and_optimizer(0)
    _step(model, opt)
    d = str(tmp_path / "checkpoints")
    os.makedirs(os.path.join(d, "step_00000009.tmp"))   # an interrupted save
    os.makedirs(os.path.join(d, "step_00000000"))       # incomplete: no trainer_state.json
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(d, step, model, opt, {}, keep_last=2)
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert sorted(os.listdir(d)) == ["latest", "step_00000003", "step_00000004"]
    assert ckpt.resolve_checkpoint(str(tmp_path)) == os.path.join(d, "step_00000004")       # run dir
    assert ckpt.resolve_checkpoint(d) == os.path.join(d, "step_00000004")                   # checkpoints dir
    assert ckpt.resolve_checkpoint(os.path.join(d, "step_00000003")) == os.path.join(d, "step_00000003")
    ckpt.save_checkpoint(d, 5, model, opt, {}, keep_last=0)   # 0 keeps everything
    assert [s for s, _, ok in ckpt.list_checkpoints(d) if ok] == [3, 4, 5]
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.resolve_checkpoint(str(tmp_path / "nothing"))
    os.remove(os.path.join(d, "step_00000005", ckpt.TRAINER_STATE))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(os.path.join(d, "step_00000005"), model, opt)


def test_gcs_checkpoint_round_trip(gcs):
    _remote_round_trip(gcs)


def test_s3_checkpoint_round_trip(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _remote_round_trip(s3)
    assert os.listdir(tmp_path) == []  # all of it went to the store, no local "s3:" directory
    assert not [f for f in storage.list_files(s3) if f.endswith(".tmp") or "/.mtnlg" in f]
    # what fusing reads: single tensors by ranged reads from the remote shard files
    from mtnlg.formats.dcp_reader import CheckpointReader

    remote_ckpt = f"{s3}/run/checkpoints/step_00000003"
    local = str(tmp_path / "step_00000003")
    storage.copy_tree(remote_ckpt, local)
    with CheckpointReader(remote_ckpt) as remote, CheckpointReader(local) as here:
        names = list(remote.model_tensors())
        assert names == list(here.model_tensors()) and len(names) > 5
        for n in names:
            assert torch.equal(remote.read("model." + n), here.read("model." + n)), n


def _remote_round_trip(root: str) -> None:
    model, opt = _model_and_optimizer(0)
    _step(model, opt)
    d = f"{root}/run/checkpoints"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(d, step, model, opt, {"consumed_samples": step}, keep_last=2)
    assert storage.read_text(f"{d}/latest").strip() == "step_00000003"
    assert [(s, ok) for s, _, ok in ckpt.list_checkpoints(d)] == [(2, True), (3, True)]
    names = {f.rsplit("/", 1)[-1] for f in storage.list_files(f"{d}/step_00000003")}
    assert {".metadata", "__0_0.distcp", "rank_00000.pt", "trainer_state.json"} <= names
    expected = _step(model, opt)
    other, other_opt = _model_and_optimizer(1)
    meta = ckpt.load_checkpoint(ckpt.resolve_checkpoint(f"{root}/run"), other, other_opt)
    assert meta["consumed_samples"] == 3
    assert _step(other, other_opt) == expected


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mtnlg-pwned",))


def test_loading_refuses_unsafe_pickles(tmp_path):
    model, opt = _model_and_optimizer(0)
    _step(model, opt)
    path = ckpt.save_checkpoint(str(tmp_path), 1, model, opt, {})
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    if os.path.exists("/tmp/mtnlg-pwned"):
        os.remove("/tmp/mtnlg-pwned")
    # the checksums already refuse the altered file, before anything is unpickled
    with pytest.raises(ckpt.CheckpointDamaged, match=".metadata: .* bytes, expected"):
        ckpt.load_checkpoint(path, model, opt)
    # and with the checksums rewritten to match (as an attacker could), the unpickler refuses it
    import shutil

    shutil.rmtree(os.path.join(path, ckpt.CHECKSUMS_DIR))
    with pytest.raises(ValueError, match="posix.system, which is not allowed"):
        ckpt.load_checkpoint(path, model, opt)
    assert not os.path.exists("/tmp/mtnlg-pwned")


def test_metadata_may_not_call_checkpoint_functions(tmp_path):
    """Names inside torch.distributed.checkpoint are allowed only as plain data classes."""
    import torch.distributed.checkpoint.filesystem as fs

    class _CallsWriter:
        def __reduce__(self):
            return (fs.FileSystemWriter, (str(tmp_path / "created-by-unpickling"),))

    path = tmp_path / ".metadata"
    with open(path, "wb") as f:
        pickle.dump(_CallsWriter(), f)
    with pytest.raises(ValueError, match="FileSystemWriter, which is not allowed"):
        ckpt.check_metadata(str(path))
    assert not (tmp_path / "created-by-unpickling").exists()


def test_a_checkpoint_that_does_not_read_back_whole_prunes_nothing(tmp_path, monkeypatch, caplog):
    """keep_last=1 and the new checkpoint's shard is cut short as it lands (a disk that lost
    the write): the previous checkpoint is the newest good one, so it stays, and `latest`
    keeps naming it; a resume uses it."""
    model, opt = _model_and_optimizer(0)
    _step(model, opt)
    d = str(tmp_path / "checkpoints")
    ckpt.save_checkpoint(d, 1, model, opt, {}, keep_last=1)
    real = ckpt._write_side_files

    def side_files_then_damage(target, *args, **kwargs):
        real(target, *args, **kwargs)
        shard = os.path.join(target, "__0_0.distcp")
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) // 2)

    monkeypatch.setattr(ckpt, "_write_side_files", side_files_then_damage)
    _step(model, opt)
    with caplog.at_level("ERROR", logger="mtnlg.formats.checkpoint"):
        ckpt.save_checkpoint(d, 2, model, opt, {}, keep_last=1)
    assert "did not read back whole (__0_0.distcp:" in caplog.text and "nothing was pruned" in caplog.text
    assert sorted(os.listdir(d)) == ["latest", "step_00000001", "step_00000002"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert ckpt.written_whole(os.path.join(d, "step_00000001")) == []
    assert ckpt.latest_good(d) == os.path.join(d, "step_00000001")
    monkeypatch.setattr(ckpt, "_write_side_files", real)
    ckpt.save_checkpoint(d, 3, model, opt, {}, keep_last=1)  # a good one again: now the old ones go
    assert sorted(os.listdir(d)) == ["latest", "step_00000003"]
