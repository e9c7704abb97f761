"""lm-evaluation-harness on our cloze items: the evaluate step writes them as a local task,
runs the harness (``--model hf``, offline) on the exported model, and both evaluators agree."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_evaluate import tokenized  # noqa: F401  (the fixture)

from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT

pytestmark = pytest.mark.e2e


def test_lm_eval_harness_agrees_with_our_cloze_accuracy(tokenized, tmp_path):
    """The evaluate step writes its cloze items as an lm-eval task; lm-evaluation-harness
    (--model hf, offline) on the exported Hugging Face model scores the same items with the
    same accuracy as our evaluator."""
    pytest.importorskip("lm_eval")
    from mtnlg.evaluate.config import EvaluateConfig
    from mtnlg.evaluate.evaluate import evaluate_model
    from mtnlg.formats.fused import save_fused
    from mtnlg.formats.tokenizer import Tokenizer
    from mtnlg.fuse.hf import export_hf

    tok = Tokenizer.from_dir(tokenized)
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_length=64, vocab_size=tok.vocab_size))
    # a model that knows something: 500 steps on the training split make some items right
    from mtnlg.formats.indexed_dataset import IndexedDataset

    train = torch.from_numpy(np.asarray(IndexedDataset(os.path.join(tokenized, "train")).tokens[:40_000],
                                        dtype=np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        starts = torch.randint(0, len(train) - 65, (16,), generator=g)
        batch = torch.stack([train[s:s + 65] for s in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    mdir = str(tmp_path / "model")
    save_fused(model.eval(), mdir, tok)
    export_hf(mdir, os.path.join(mdir, "hf"))
    m = evaluate_model(mdir, tokenized, str(tmp_path / "eval"),
                       config=EvaluateConfig(max_cloze_items=60, prompts=["The list"], max_new_tokens=4,
                                             run_lm_eval=True))
    assert m["lm_eval_cloze_items"] == m["cloze_items"] >= 40
    assert 0 < m["cloze_correct"] < m["cloze_items"]  # neither trivial nor hopeless
    assert m["lm_eval_cloze_accuracy"] == pytest.approx(m["cloze_accuracy"], abs=1e-9)
    task = tmp_path / "eval" / "lm_eval" / "mtnlg_cloze.yaml"
    assert task.exists() and "output_type: loglikelihood" in task.read_text()
    lines = (tmp_path / "eval" / "lm_eval" / "mtnlg_cloze.jsonl").read_text().splitlines()
    assert len(lines) == m["cloze_items"] and json.loads(lines[0])["target"].startswith(" ")
