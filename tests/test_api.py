"""The Python API end to end: a tiny model trained on a few KB of text through
extract -> tokenize -> train -> fuse, then generate, call, save and load."""

from __future__ import annotations

import gzip
import os

import pytest
import torch

pytestmark = pytest.mark.e2e

CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "python-docs", "whatsnew")


def test_megatronlm_trains_generates_saves_and_loads(tmp_path):
    from mtnlg import MegatronLM, load_data

    with gzip.open(os.path.join(CORPUS, "2.0.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read()[:12000]
    (tmp_path / "notes.txt").write_text(text, encoding="utf-8")
    data = load_data(str(tmp_path / "notes.txt"))
    assert data.inputs == (str(tmp_path / "notes.txt"),) and data.total_bytes >= 12000

    model = MegatronLM(num_layers=2, hidden_size=32, num_heads=2, seq_length=32)
    run = model.train(data, steps=4, tp=1, nproc=1, output=str(tmp_path / "run"), batch_size=4,
                      overrides=["train.micro_batch_size=4", "train.eval_iters=0"])
    assert run["train"]["steps"] == 4 and run["extract"]["splits"]["validation"]["docs"] > 0
    assert os.path.exists(os.path.join(run["paths"]["model"], "model.safetensors"))
    assert model.cfg.vocab_size == model.tokenizer.vocab_size == run["tokenize"]["vocab_size"]

    out = model.generate("The new version", max_new_tokens=8)
    assert isinstance(out, str)
    ids = model.encode("The new version")
    logits = model([ids])
    assert logits.shape == (1, len(ids), model.cfg.vocab_size)  # the vocabulary, not its padding
    assert model(ids).shape == logits.shape[1:]

    model.save(str(tmp_path / "saved"))
    again = MegatronLM.load(str(tmp_path / "saved"))
    assert torch.equal(again([ids]), logits)
    assert again.generate("The new version", max_new_tokens=8) == out
    # the object trains on data; the GPT it holds is the nn.Module
    assert not isinstance(model, torch.nn.Module) and isinstance(model.module, torch.nn.Module)
    assert model.module.train(False) is model.module and not model.module.training


def test_api_errors_are_clear(tmp_path):
    from mtnlg import MegatronLM, load_data

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(str(tmp_path / "nope.txt"))
    with pytest.raises(TypeError, match="unknown model setting 'num_layer'"):
        MegatronLM(num_layer=2)
    with pytest.raises(ValueError, match="no tokenizer yet"):
        MegatronLM(preset="debug").generate("hi")
    m = MegatronLM(preset="debug")
    assert m.cfg.num_layers == 2 and m(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


def test_too_little_text_for_a_validation_split_is_a_clear_error(tmp_path):
    from mtnlg import MegatronLM, load_data

    text = tmp_path / "one.txt"
    text.write_text(" ".join(f"word{i} is a fine word for a sentence" for i in range(12)) + "\n")
    with pytest.raises(ValueError, match="none fell into the validation split"):
        MegatronLM(preset="debug").train(load_data(str(text)), steps=1, output=str(tmp_path / "run"))


def test_load_data_finds_s3_files(s3):
    from mtnlg import load_data, storage

    storage.write_text(f"{s3}/notes/a.txt", "x" * 100)
    storage.write_text(f"{s3}/notes/more/b.jsonl", '{"text": "y"}\n')
    data = load_data(f"{s3}/notes")
    assert data.inputs == (f"{s3}/notes/a.txt", f"{s3}/notes/more/b.jsonl") and data.total_bytes == 114
    assert load_data([f"{s3}/notes/*.txt"]).inputs == (f"{s3}/notes/a.txt",)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_data(f"{s3}/missing")


def test_the_seeds_positional_form_and_parameters_from_the_start():
    from mtnlg import MegatronLM
    from mtnlg.model.flops import count_parameters

    big = MegatronLM(24, 1024)                                    # the seed's example: not built until used
    assert (big.cfg.num_layers, big.cfg.hidden_size, big.cfg.num_heads) == (24, 1024, 16)
    small = MegatronLM(2, 128, seq_length=64)
    assert small.cfg.num_heads == 2 and small.cfg.vocab_size == 512           # default vocabulary until data
    assert small.num_parameters() == count_parameters(small.cfg) > 0          # parameters before training
    assert small(torch.tensor([[1, 2, 3]])).shape == (1, 3, small.cfg.vocab_size)
    assert MegatronLM(2, 128, num_heads=8).cfg.num_heads == 8
