"""The tokenize step end to end on real English text (the bundled Python "What's New" pages)."""

from __future__ import annotations

import glob
import gzip
import json
import os

import numpy as np
import pytest
from test_indexed_dataset import megatron_read

from mtnlg import storage
from mtnlg.cli import main as cli_main
from mtnlg.formats.indexed_dataset import IndexedDataset
from mtnlg.formats.tokenizer import Tokenizer
from mtnlg.tokenize.config import TokenizeConfig
from mtnlg.tokenize.tokenize import _sample_lines, tokenize

pytestmark = pytest.mark.unit

CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "python-docs", "whatsnew")
VOCAB = 600


def whatsnew_documents(n_files: int = 3) -> list[str]:
    """Documents of five paragraphs each from the first ``n_files`` What's New pages."""
    docs = []
    for path in sorted(glob.glob(os.path.join(CORPUS, "*.txt.gz")))[:n_files]:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            paras = [p for p in f.read().split("\n\n") if p.strip()]
        docs += ["\n\n".join(paras[i:i + 5]) for i in range(0, len(paras), 5)]
    return docs


def write_split(root, split: str, docs: list, n_parts: int = 2, raw_lines=()) -> None:
    """``root/split/part-*.jsonl`` as mtnlg extract writes them (plus raw lines, if given)."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    lines = [json.dumps({"id": f"{split}-{i}", "text": d, "source": "whatsnew"}) for i, d in enumerate(docs)]
    lines += list(raw_lines)
    per = -(-len(lines) // n_parts)
    for p in range(n_parts):
        with open(os.path.join(root, split, f"part-{p:05d}-of-{n_parts:05d}.jsonl"), "w") as f:
            f.writelines(line + "\n" for line in lines[p * per:(p + 1) * per])


@pytest.fixture(scope="module")
def corpus():
    docs = whatsnew_documents()
    return docs[:-20], docs[-20:]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, corpus):
    root = str(tmp_path_factory.mktemp("extracted"))
    write_split(root, "train", corpus[0])
    write_split(root, "validation", corpus[1], n_parts=1)
    return root


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, extracted):
    out = str(tmp_path_factory.mktemp("tokens"))
    stats = tokenize(extracted, out, TokenizeConfig(vocab_size=VOCAB, workers=1))
    return out, stats


def test_round_trip_and_outputs(tokenized, corpus):
    out, stats = tokenized
    assert sorted(f for f in os.listdir(out)) == [
        "stats.json", "tokenizer.json", "tokenizer.model", "train.bin", "train.idx",
        "validation.bin", "validation.idx"]
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == VOCAB and tok.eod_id == 2
    meta = json.load(open(os.path.join(out, "tokenizer.json")))
    assert meta["vocab_size"] == VOCAB and meta["eod_id"] == 2 and meta["bos_id"] == 1
    assert meta["pad_id"] == 3 and meta["unk_id"] == 0 and meta["model_type"] == "bpe"
    assert meta["dtype"] == "uint16" and meta["trained"] is True
    for split, docs in zip(("train", "validation"), corpus):
        ds = IndexedDataset(os.path.join(out, split))
        ds.check()
        assert len(ds) == len(docs)
        for i, text in enumerate(docs):
            assert ds[i][-1] == tok.eod_id and tok.eod_id not in ds[i][:-1]
            assert tok.decode(ds[i]) == text
            assert ds[i][:-1].tolist() == tok.encode(text)
        # an independent reader of Megatron's format sees the same documents
        dtype, seqs, doc_idx = megatron_read(os.path.join(out, split))
        assert dtype == np.uint16 and doc_idx.tolist() == list(range(len(docs) + 1))
        assert all(np.array_equal(s, ds[i]) for i, s in enumerate(seqs))
        st = stats["splits"][split]
        assert st["documents"] == st["read"] == len(docs) and st["files"] == (2 if split == "train" else 1)
        assert st["tokens"] == ds.num_tokens and sum(st["skipped"].values()) == 0
    assert stats["documents"] == sum(len(d) for d in corpus)
    assert stats["vocab_size"] == VOCAB and stats["tokens_per_s"] > 0
    assert json.load(open(os.path.join(out, "stats.json")))["tokens"] == stats["tokens"]


def test_workers_and_chunks_do_not_change_a_byte(tokenized, extracted, tmp_path):
    out, _ = tokenized
    cfg = TokenizeConfig(vocab_size=VOCAB, workers=2, chunk_bytes=4096)
    stats = tokenize(extracted, str(tmp_path), cfg)
    assert stats["workers"] == 2
    for name in ("tokenizer.model", "train.bin", "train.idx", "validation.bin", "validation.idx"):
        assert open(os.path.join(out, name), "rb").read() == open(tmp_path / name, "rb").read(), name


def test_reuse_given_tokenizer(tokenized, extracted, tmp_path):
    out, _ = tokenized
    stats = tokenize(extracted, str(tmp_path), TokenizeConfig(tokenizer=os.path.join(out, "tokenizer.model"),
                                                              workers=1, splits=["validation"]))
    assert stats["tokenizer"]["trained"] is False and stats["vocab_size"] == VOCAB
    reused = open(tmp_path / "validation.bin", "rb").read()
    assert reused == open(os.path.join(out, "validation.bin"), "rb").read()
    assert not os.path.exists(tmp_path / "train.bin")


def test_skipped_documents_are_counted(tmp_path, corpus):
    src = str(tmp_path / "in")
    bad = ["{not json", json.dumps({"id": "x", "source": "s"}), json.dumps(["a list"]),
           json.dumps({"id": "e", "text": "   \n ", "source": "s"}),
           json.dumps({"id": "z", "text": "\u200b\u200b", "source": "s"}), "", "   "]
    write_split(src, "train", corpus[0][:40], raw_lines=bad)
    write_split(src, "validation", corpus[1][:5], n_parts=1)
    # a model trained with SentencePiece's defaults (nmt_nfkc normalization, extra whitespace
    # removed) turns zero-width spaces into nothing, so that document encodes to no tokens
    import sentencepiece as spm

    model = str(tmp_path / "default.model")
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus[0]), model_writer=f,
                                       vocab_size=VOCAB, minloglevel=2)
    stats = tokenize(src, str(tmp_path / "out"), TokenizeConfig(tokenizer=model, workers=1))
    st = stats["splits"]["train"]
    assert st["skipped"] == {"malformed_json": 1, "missing_text": 2, "empty_text": 1, "empty_encoding": 1}
    assert st["documents"] == 40 and st["read"] == 45 == st["documents"] + sum(st["skipped"].values())
    assert stats["skipped"]["missing_text"] == 2 and stats["read"] == 50


def test_tokenizer_sample_is_bounded_and_deterministic(extracted):
    files = sorted(glob.glob(os.path.join(extracted, "train", "*.jsonl")))
    lines, nbytes = _sample_lines(files, budget=30000, block=5000)
    total = sum(os.path.getsize(f) for f in files)
    assert nbytes < 30000 + 6 * 4000 < total  # six blocks, each finishing its last line
    assert (lines, nbytes) == _sample_lines(files, budget=30000, block=5000)
    last_file_text = open(files[-1]).read()
    assert any(line in last_file_text for line in lines[-5:])  # the sample reaches the last part
    all_lines, all_bytes = _sample_lines(files, budget=10 ** 9, block=5000)
    assert all_bytes == total and len(all_lines) > len(lines)


def test_vocab_larger_than_corpus_supports(extracted, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"vocab_size 50000 is larger than .*train supports "
                                         r"\(at most \d+ pieces\); use --vocab-size \d+ or less"):
        tokenize(extracted, str(out), TokenizeConfig(vocab_size=50000, workers=1, train_sample_bytes=20000))
    assert os.listdir(out) == []  # nothing half-written
    with pytest.raises(ValueError, match=r"vocab_size 300 is too small .* need \d+ ids"):
        tokenize(extracted, str(out), TokenizeConfig(vocab_size=300, workers=1))


def test_missing_or_corrupt_tokenizer(extracted, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model .*nope.model does not exist"):
        tokenize(extracted, str(tmp_path / "a"), TokenizeConfig(tokenizer=str(tmp_path / "nope.model")))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\x05hello this is not a model")
    with pytest.raises(ValueError, match="bad.model is not a valid SentencePiece model"):
        tokenize(extracted, str(tmp_path / "b"), TokenizeConfig(tokenizer=str(bad)))
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="bad.model is empty"):
        Tokenizer(str(bad))


def test_empty_or_missing_split(tmp_path, corpus, tokenized):
    src = str(tmp_path / "in")
    write_split(src, "train", corpus[0][:30])
    with pytest.raises(FileNotFoundError, match=r"split directory .*in/validation does not exist"):
        tokenize(src, str(tmp_path / "o1"), TokenizeConfig(vocab_size=VOCAB, workers=1))
    os.makedirs(os.path.join(src, "validation"))
    with pytest.raises(ValueError, match=r"split 'validation' is empty: .*no \*\.jsonl"):
        tokenize(src, str(tmp_path / "o2"), TokenizeConfig(vocab_size=VOCAB, workers=1))
    write_split(src, "validation", [], n_parts=1, raw_lines=[json.dumps({"id": "a", "text": ""})])
    out = tmp_path / "o3"
    model = os.path.join(tokenized[0], "tokenizer.model")
    with pytest.raises(ValueError, match=r"split 'validation' .* has no documents to tokenize: read 1"):
        tokenize(src, str(out), TokenizeConfig(tokenizer=model, workers=1))
    assert os.listdir(out) == []  # the finished train split was not published either


@pytest.fixture(params=["gcs", "s3"])
def remote(request):
    return request.getfixturevalue(request.param)


def test_remote_input_and_output(extracted, tokenized, remote):
    storage.copy_tree(extracted, storage.join(remote, "extracted"))
    out = storage.join(remote, "tokens")
    stats = tokenize(storage.join(remote, "extracted"), out, TokenizeConfig(vocab_size=VOCAB, workers=2))
    assert stats["documents"] == tokenized[1]["documents"]
    local = tokenized[0]
    for name in ("tokenizer.model", "train.idx", "train.bin", "validation.idx", "stats.json"):
        assert storage.exists(storage.join(out, name)), name
    for name in ("tokenizer.model", "train.bin", "train.idx", "validation.bin"):
        assert storage.read_bytes(storage.join(out, name)) == open(os.path.join(local, name), "rb").read(), name
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == VOCAB
    # reuse the remote tokenizer
    stats2 = tokenize(storage.join(remote, "extracted"), storage.join(remote, "again"),
                      TokenizeConfig(tokenizer=storage.join(out, "tokenizer.model"), workers=1))
    assert stats2["tokens"] == stats["tokens"]
    with pytest.raises(FileNotFoundError, match=r"input directory (gs|s3)://.*/missing does not exist"):
        tokenize(storage.join(remote, "missing"), storage.join(remote, "x"), TokenizeConfig(vocab_size=VOCAB))


def test_cli(extracted, tokenized, tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = cli_main(["tokenize", extracted, "--output", out, "--vocab-size", str(VOCAB), "--workers", "1",
                   "model_type=unigram", "split_digits=false"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == tokenized[1]["documents"] and summary["vocab_size"] == VOCAB
    meta = json.load(open(os.path.join(out, "tokenizer.json")))
    assert meta["model_type"] == "unigram"
    assert json.load(open(os.path.join(out, "stats.json")))["config"]["split_digits"] is False
    tok = Tokenizer.from_dir(out)
    ds = IndexedDataset(os.path.join(out, "validation"))
    assert tok.decode(ds[0]) == json.loads(open(glob.glob(os.path.join(extracted, "validation", "*"))[0])
                                           .readline())["text"]
    # reuse via --tokenizer; config errors exit 2, input errors exit 1, both with a message
    assert cli_main(["tokenize", extracted, "-o", str(tmp_path / "c2"), "--tokenizer",
                     os.path.join(out, "tokenizer.model"), "--workers", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["tokenize", extracted, "-o", out, "vocab_sise=5"]) == 2
    assert "did you mean 'vocab_size'" in capsys.readouterr().err
    assert cli_main(["tokenize", extracted, "-o", out, "--vocab-size", "100"]) == 2
    assert "leaves no room" in capsys.readouterr().err
    assert cli_main(["tokenize", str(tmp_path / "nowhere"), "-o", out]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err


def test_tokenizer_api(tokenized, tmp_path):
    tok = Tokenizer(os.path.join(tokenized[0], "tokenizer.model"))
    text = "Python 3.1 adds  ordered dictionaries.\n\tIndented ünïcödé"
    ids = tok.encode(text)
    assert tok.decode(ids + [tok.eod_id]) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text
    assert tok.encode_batch([text, "x"], num_threads=2)[0] == ids
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside the vocabulary"):
        tok.decode([1, VOCAB])
    with pytest.raises(ValueError, match="is a directory"):
        Tokenizer(tokenized[0])


def test_model_without_end_of_document_token(tmp_path, corpus):
    import sentencepiece as spm

    model = tmp_path / "noeos.model"
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus[1]), model_writer=f, vocab_size=300,
                                       eos_id=-1, minloglevel=2)
    with pytest.raises(ValueError, match="noeos.model has no end-of-document token"):
        Tokenizer(str(model))


def test_config_checks():
    from mtnlg.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="trained on the 'train' split"):
        load_config(TokenizeConfig, overrides=["splits=[validation]"])
    with pytest.raises(ConfigError, match="already a special piece"):
        load_config(TokenizeConfig, overrides=["user_defined_symbols=[</s>]"])
    with pytest.raises(ConfigError, match="uint16 holds ids < 65536"):
        load_config(TokenizeConfig, overrides=["vocab_size=70000", "dtype=uint16"])
    with pytest.raises(ConfigError, match="model_type: expected one of"):
        load_config(TokenizeConfig, overrides=["model_type=wordpiece"])
    cfg = load_config(TokenizeConfig, overrides=["user_defined_symbols=[<|a|>,<|b|>]", "splits=[validation]",
                                                 "tokenizer=x.model"])
    assert cfg.symbols() == ["\n", "<|a|>", "<|b|>"]
