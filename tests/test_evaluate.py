"""Evaluation: loss over a token stream, cloze construction and accuracy, the report files,
and ``mtnlg evaluate`` end to end on a tiny tokenized directory."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from corpus_data import tokenized_dir

from mtnlg.evaluate.cloze import ClozeItem, make_cloze_items, passage_and_word
from mtnlg.evaluate.metrics import cloze_accuracy, stream_loss
from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT

pytestmark = pytest.mark.unit

SENTENCES = [
    "The list type supports append, insert and pop, and lists may be sorted in place.",
    "A dictionary maps hashable keys to arbitrary values and keeps insertion order.",
    "Functions are defined with the def keyword and may return several values as a tuple.",
    "Modules group related code, and a package is a directory of modules with an init file.",
    "Exceptions propagate up the call stack until a matching except clause handles them.",
    "Generators produce values lazily, one at a time, whenever the caller asks for the next one.",
]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> str:
    """A tokenized directory (train + validation) through the real tokenize step."""
    rng = np.random.default_rng(0)
    docs = [" ".join(SENTENCES[j] for j in rng.integers(0, len(SENTENCES), size=4)) for _ in range(340)]
    return tokenized_dir(tmp_path_factory.mktemp("evaldata"), docs[:300], docs[300:], vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tokenized, tmp_path_factory) -> str:
    from mtnlg.formats.tokenizer import Tokenizer
    from mtnlg.formats.fused import save_fused

    tok = Tokenizer.from_dir(tokenized)
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_length=64, vocab_size=tok.vocab_size))
    out = str(tmp_path_factory.mktemp("model") / "m")
    save_fused(model, out, tok)
    return out


def test_stream_loss_is_mean_token_nll_and_perplexity_its_exp():
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=1, hidden_size=16, num_heads=2, seq_length=8, vocab_size=50)).eval()
    stream = np.random.default_rng(1).integers(0, 50, size=30)
    res = stream_loss(model, stream, seq_length=8, batch_size=3)
    # reference: every token predicted once, from the context inside its 8-token window
    nll, n = 0.0, 0
    for s in range(0, 29, 8):
        w = torch.tensor(stream[s:s + 9])
        with torch.no_grad():
            logits = model(w[None, :-1])[0]
        nll += float(F.cross_entropy(logits, w[1:], reduction="sum"))
        n += len(w) - 1
    assert res.tokens == n == 29 and res.windows == 4
    assert res.loss == pytest.approx(nll / n, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(res.loss), rel=1e-9)


def test_passage_and_word():
    assert passage_and_word("Lists are sorted in place.") == ("Lists are sorted in", "place")
    assert passage_and_word("Call it with x = 3.") == ("Call it", "with")  # the last alphabetic word
    assert passage_and_word("nothing") is None
    assert passage_and_word("12 34 56") is None


def test_cloze_items_count_every_document(tokenized):
    from mtnlg.formats.indexed_dataset import IndexedDataset
    from mtnlg.formats.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenized)
    ds = IndexedDataset(os.path.join(tokenized, "validation"))
    items, stats = make_cloze_items(ds, tok, seq_length=64, max_items=30)
    assert stats.passages == stats.items + sum(stats.skipped.values())
    assert 0 < len(items) == stats.items <= 30
    for it in items:
        # a document's first passage starts as documents do in training; later ones mid-document
        assert (it.context[0] == tok.eod_id) == (it.start == 0)
        assert tok.decode(it.target).strip() == it.word
        assert len(it.context) + len(it.target) - 1 <= 64
        assert tok.decode(it.context[1:] if it.start == 0 else it.context) in tok.decode(ds[it.doc])


def test_cloze_items_are_cut_from_every_part_of_every_document(tokenized):
    """Long documents give several passages each, and a cap spreads the items over all the
    documents instead of taking the first few."""
    from mtnlg.formats.indexed_dataset import IndexedDataset
    from mtnlg.formats.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenized)
    ds = IndexedDataset(os.path.join(tokenized, "validation"))
    everything, st = make_cloze_items(ds, tok, seq_length=64, max_items=10_000)
    assert st.passages > len(ds) and st.documents == len(ds)
    assert len({(it.doc, it.start) for it in everything}) == len(everything)
    assert max(sum(it.doc == d for it in everything) for d in range(len(ds))) > 1
    capped, cst = make_cloze_items(ds, tok, seq_length=64, max_items=20)
    assert 10 <= len(capped) <= 20 and cst.passages == cst.items + sum(cst.skipped.values())
    docs = sorted({it.doc for it in capped})
    assert docs[-1] >= len(ds) - 5 and len(docs) >= 10  # spread over the split, not its first documents


def test_cloze_accuracy_counts_whole_words():
    class Oracle(torch.nn.Module):
        """Predicts token (x + 1) after token x."""

        def forward(self, x):
            return F.one_hot((x + 1) % 10, 10).float() * 5

    items = [ClozeItem(context=[1, 2, 3], target=[4, 5], word="a", doc=0),   # right
             ClozeItem(context=[1, 2], target=[3, 9], word="b", doc=1),      # second piece wrong
             ClozeItem(context=[6], target=[7], word="c", doc=2)]            # right
    out = cloze_accuracy(Oracle(), items, batch_size=2)
    assert out["cloze_items"] == 3 and out["cloze_correct"] == 2
    assert out["cloze_accuracy"] == pytest.approx(2 / 3)


def test_evaluate_end_to_end_writes_report(tokenized, model_dir, tmp_path):
    from mtnlg.cli import main
    from mtnlg.formats.indexed_dataset import IndexedDataset

    log = tmp_path / "log.jsonl"
    with open(log, "w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "loss": 6.0 - 0.3 * step, "lr": 1e-3 * step / 10}) + "\n")
        f.write("not json\n")
    out = tmp_path / "eval"
    assert main(["evaluate", model_dir, "--data", tokenized, "--output", str(out), "--train-log", str(log),
                 "--max-new-tokens", "5", "--max-cloze-items", "20"]) == 0
    for name in ("metrics.json", "report.md", "report.html", "loss.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    val = IndexedDataset(os.path.join(tokenized, "validation"))
    assert m["val_tokens"] == val.num_tokens  # the whole split, every token once
    assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-9)
    lo, hi = m["val_perplexity_ci95"]
    assert lo < m["val_perplexity"] < hi and m["val_loss_ci95"][0] < m["val_loss"] < m["val_loss_ci95"][1]
    clo, chi = m["cloze_accuracy_ci95"]
    assert clo <= m["cloze_accuracy"] <= chi
    # an untrained model: close to uniform over the padded vocabulary
    assert 0.5 * math.log(384) < m["val_loss"] < 2 * math.log(384)
    # each item scored again alone (no batch, no padding): right when every piece of its word is the argmax
    from mtnlg.evaluate.cloze import make_cloze_items
    from mtnlg.formats.fused import load_fused
    from mtnlg.formats.tokenizer import Tokenizer

    model, cfg, _ = load_fused(model_dir)
    items, _ = make_cloze_items(val, Tokenizer.from_dir(tokenized), cfg.seq_length, max_items=20)
    correct = sum(_greedy_gets_the_word(model, it) for it in items)
    assert (m["cloze_items"], m["cloze_correct"]) == (len(items), correct) and len(items) > 0
    assert m["cloze_accuracy"] == correct / len(items)
    assert m["cloze_passages"] == m["cloze_items"] + sum(m["cloze_skipped"].values())
    assert m["train_steps"] == 10 and m["train_log_skipped"] == 1
    assert m["train_final_loss"] == pytest.approx(3.0)
    assert len(m["samples"]) == 5 and all(isinstance(s["completion"], str) for s in m["samples"])
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "validation perplexity" in html
    assert "![training loss](loss.png)" in (out / "report.md").read_text()


def _greedy_gets_the_word(model, item: ClozeItem) -> bool:
    seq = item.context + item.target
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]]))[0]                  # (len - 1, V_padded)
    c = len(item.context)
    return logits[c - 1:].argmax(-1).tolist() == item.target


def test_cloze_accuracy_of_a_model_built_to_know_some_words(tokenized, tmp_path):
    """A GPT whose blocks add nothing and whose output maps each token to one chosen next
    token (a bigram table): which items it gets right follows from the table alone, with no
    model run. `mtnlg evaluate` must report exactly that count."""
    from mtnlg.cli import main
    from mtnlg.evaluate.cloze import make_cloze_items
    from mtnlg.formats.fused import save_fused
    from mtnlg.formats.indexed_dataset import IndexedDataset
    from mtnlg.formats.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenized)
    V, H = tok.vocab_size, 384                                            # H >= padded vocabulary: one-hot embeddings
    items, _ = make_cloze_items(IndexedDataset(os.path.join(tokenized, "validation")), tok, 64, max_items=20)
    table = [tok.eod_id] * V            # next token after each token: the first item that needs it decides
    decided: set[int] = set()
    for it in items:
        seq, c = it.context + it.target, len(it.context)
        for k, want in enumerate(it.target):
            if seq[c - 1 + k] not in decided:
                decided.add(seq[c - 1 + k])
                table[seq[c - 1 + k]] = want
    right = sum(all(table[(it.context + it.target)[len(it.context) - 1 + k]] == w for k, w in enumerate(it.target))
                for it in items)
    assert 0 < right < len(items)                                         # some words known, not all

    model = GPT(ModelConfig(num_layers=1, hidden_size=H, num_heads=4, seq_length=64, vocab_size=V,
                            tie_embeddings=False))
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(torch.eye(model.vocab_size_padded, H))   # token i -> e_i
        model.pos_embeddings.weight.zero_()
        for layer in model.layers:                                        # the residual stream passes unchanged
            for lin in (layer.attention.wo, layer.mlp.w_down):
                lin.weight.zero_()
                lin.bias.zero_()
        model.output.weight.zero_()                                       # logit of table[i] after i: the largest
        model.output.weight[torch.tensor(table), torch.arange(V)] = 1.0
    save_fused(model, str(tmp_path / "m"), tok)
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "m"), "--data", tokenized, "--output", str(out), "--max-cloze-items", "20",
                 "--max-new-tokens", "1", "--prompt", "The list"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    written = [json.loads(line) for line in (out / "lm_eval" / "mtnlg_cloze.jsonl").read_text().splitlines()]
    assert [(w["doc"], w["start"]) for w in written] == [(it.doc, it.start) for it in items]  # the same items
    assert (m["cloze_items"], m["cloze_correct"]) == (len(items), right)
    assert m["cloze_accuracy"] == right / len(items)


def test_evaluate_refuses_data_from_another_tokenizer(tokenized, model_dir, tmp_path):
    import shutil

    from mtnlg.evaluate.evaluate import evaluate_model

    other = tmp_path / "other"
    shutil.copytree(tokenized, other)
    meta = json.loads((other / "tokenizer.json").read_text())
    meta["sha256"] = "0" * 64
    (other / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different tokenizer"):
        evaluate_model(model_dir, str(other), str(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match="validation"):
        os.remove(other / "validation.idx")
        meta["sha256"] = json.loads(open(os.path.join(tokenized, "tokenizer.json")).read())["sha256"]
        (other / "tokenizer.json").write_text(json.dumps(meta))
        evaluate_model(model_dir, str(other), str(tmp_path / "e"))


def test_fused_model_and_data_on_s3(tokenized, model_dir, s3, tmp_path):
    """A fused model saved to and loaded from s3://, evaluated on s3:// data into s3://,
    gives exactly what the local directories give."""
    from mtnlg import storage
    from mtnlg.evaluate.config import EvaluateConfig
    from mtnlg.evaluate.evaluate import evaluate_model
    from mtnlg.formats.fused import load_fused, save_fused

    model, cfg, tok = load_fused(model_dir, decode_layout=False)
    save_fused(model, f"{s3}/model", tok)
    assert storage.exists(f"{s3}/model/manifest.json") and not os.path.exists(f"{s3}/model")
    back, back_cfg, back_tok = load_fused(f"{s3}/model", decode_layout=False)
    assert back_cfg == cfg and back_tok.model_bytes == tok.model_bytes
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n

    storage.copy_tree(tokenized, f"{s3}/tokens")
    c = EvaluateConfig(max_cloze_items=5, prompts=["The list"], max_new_tokens=2)
    remote = evaluate_model(f"{s3}/model", f"{s3}/tokens", f"{s3}/eval", config=c)
    local = evaluate_model(model_dir, tokenized, str(tmp_path / "eval"), config=c)
    assert remote["val_loss"] == local["val_loss"] and remote["val_tokens"] == local["val_tokens"] > 0
    assert json.loads(storage.read_text(f"{s3}/eval/metrics.json"))["val_loss"] == local["val_loss"]


def test_confidence_intervals_of_accuracy_and_loss():
    from mtnlg.evaluate.metrics import ratio_interval, wilson_interval
    from mtnlg.evaluate.report import _rows

    lo, hi = wilson_interval(1, 18)                       # make run's cloze: 1 right of 18
    assert lo == pytest.approx(0.00988, abs=1e-4) and hi == pytest.approx(0.2576, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(500, 1000)[1] - wilson_interval(500, 1000)[0] < 0.07   # narrows with n
    # equal windows: the ratio interval is the mean's normal interval
    sums, counts = [1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1]
    lo, hi = ratio_interval(sums, counts)
    assert (lo + hi) / 2 == pytest.approx(2.5) and hi - lo == pytest.approx(2 * 1.96 * 1.2910 / 2, rel=1e-3)
    rows = dict(_rows({"cloze_accuracy": 1 / 18, "cloze_accuracy_ci95": [0.0099, 0.2576], "cloze_items": 18,
                       "val_perplexity": 270.7, "val_perplexity_ci95": [260.1, 281.9]}))
    assert rows["validation perplexity"] == "270.7 (95% CI 260.1-281.9)"
    assert "only 18 items: too few to conclude" in rows["last-word accuracy"]

