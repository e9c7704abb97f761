"""A newcomer's common mistakes, each caught with one line that names the fix: a Hugging
Face export or a training run given where a fused model is expected, one training process
where the layout needs more."""

from __future__ import annotations

import pytest
import torch
from test_generate import tiny_model, tokenizer  # noqa: F401  (the fixture)

from mtnlg.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def fused(tokenizer, tmp_path_factory):  # noqa: F811
    from mtnlg.formats.fused import save_fused
    from mtnlg.fuse.hf import export_hf

    d = tmp_path_factory.mktemp("fused") / "model"
    save_fused(tiny_model(), str(d), tokenizer)
    export_hf(str(d), str(d / "hf"))
    return d


def test_a_hugging_face_export_given_as_the_model_names_the_fused_directory(fused, capsys):
    assert main(["generate", str(fused / "hf"), "--prompt", "The list", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err == (f"mtnlg generate: error: {fused / 'hf'} is a Hugging Face export (config.json of model_type "
                   f"'gpt2'), not a fused model: give its fused model directory ({fused}), or load the export "
                   "with transformers\n")
    assert main(["generate", str(fused), "--prompt", "The list", "--max-new-tokens", "2"]) == 0  # as it says


def test_a_training_run_given_as_the_model_prints_the_fuse_command(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["generate", str(run), "--prompt", "x"]) == 1
    assert capsys.readouterr().err == (f"mtnlg generate: error: {run} is a training run, not a fused model: fuse it "
                                       f"first, mtnlg fuse {run} --output {run}-model\n")


def test_one_process_for_a_two_way_layout_names_nproc(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", "--recipe", "debug", f"data.path={tmp_path}", f"output={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err == (
        "mtnlg train: configuration error: world size 1 is not divisible by parallel.tp * parallel.pp = 2 * 1 = 2 "
        "(this is one process: --nproc N starts N training processes, e.g. --nproc 2, or launch it with torchrun)\n")
    assert not (tmp_path / "out").exists()
    assert torch.distributed.is_available() and not torch.distributed.is_initialized()


def _checkpoint(root, model: dict, tp: int):
    import json

    d = root / "checkpoints" / "step_00000020"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"format": "mtnlg-dcp-1", "step": 20, "model": model,
                                                      "layout": {"tp": tp, "pp": 1}}))
    (root / "checkpoints" / "latest").write_text("step_00000020\n")
    return d


def test_resuming_from_a_checkpoint_of_another_padding_names_the_override(tmp_path):
    """A checkpoint resharded from tp=2 to tp=1 keeps its 8192 embedding rows; a run that
    pads the 8000-token vocabulary to 8064 for tp=1 is told the override, before launch."""
    from mtnlg.config import ConfigError, load_config, to_dict
    from mtnlg.train.checkpointer import check_resume
    from mtnlg.train.config import TrainRunConfig, recipe

    cfg = load_config(TrainRunConfig, overrides=["model.vocab_size=8000", "parallel.tp=1", f"output={tmp_path}"],
                      base=recipe("debug"))
    saved = dict(to_dict(cfg.model), make_vocab_size_divisible_by=8192)  # as mtnlg reshard --tp 1 wrote it
    path = _checkpoint(tmp_path, saved, tp=1)
    with pytest.raises(ConfigError) as e:
        check_resume(cfg)
    assert str(e.value) == (f"the checkpoint {path} holds a vocabulary padded to 8192 rows "
                            "(model.make_vocab_size_divisible_by=8192, tp=1), this run pads it to 8064 "
                            "(make_vocab_size_divisible_by=128 x parallel.tp=1): set "
                            "model.make_vocab_size_divisible_by=8192 to resume from it")
    fixed = load_config(TrainRunConfig, overrides=["model.make_vocab_size_divisible_by=8192"], base=to_dict(cfg))
    assert check_resume(fixed) == str(path)
    wider = load_config(TrainRunConfig, overrides=["model.hidden_size=128"], base=to_dict(fixed))
    with pytest.raises(ConfigError, match=r"^model.hidden_size=128 but the checkpoint .* was trained with "
                                          r"model.hidden_size=64: set model.hidden_size=64 to resume"):
        check_resume(wider)
    assert check_resume(load_config(TrainRunConfig, overrides=["checkpoint.load=none"], base=to_dict(wider))) is None


def test_fuse_never_deletes_what_it_did_not_write(fused, tmp_path):
    """Fuse replaces a fused model whole, so it first checks that everything there is the
    model's: a folder of other files, files the model does not list, or a Hugging Face export
    that a fuse without --hf would not rewrite, are refused before anything is read."""
    import shutil

    from mtnlg.fuse.fuse import fuse_checkpoint

    missing = str(tmp_path / "no-checkpoint")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes exists and is not a fused model directory \(1 files, e.g. todo.txt\)"):
        fuse_checkpoint(missing, str(other))
    model = tmp_path / "model"
    shutil.copytree(fused, model)
    with pytest.raises(ValueError, match=r"model/hf holds a Hugging Face export that this fuse would delete without "
                                         r"writing a new one: pass --hf"):
        fuse_checkpoint(missing, str(model), hf=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):  # with --hf the check passes: it rewrites hf/
        fuse_checkpoint(missing, str(model), hf=True)
    (model / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match=r"model holds files the fused model there does not list \(notes.md\)"):
        fuse_checkpoint(missing, str(model), hf=True)
    assert (model / "notes.md").read_text() == "mine" and (model / "hf" / "config.json").exists()


def test_a_store_that_does_not_answer_is_one_line(monkeypatch, capsys):
    """gs:// on an emulator address where nothing listens: the storage layer's retries end
    in one line naming the URI, the operation and the attempts; no traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MTNLG_STORAGE_ATTEMPTS", "1")
    assert main(["generate", "gs://nobucket/model", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mtnlg generate: error: gs://nobucket/model: list failed 1 times, the last with "
                          "ConnectionError") and err.count("\n") == 1 and "Traceback" not in err, err
