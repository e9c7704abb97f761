"""The pipeline's steps on gs:// and s3:// behind a proxy that fails about 15% of requests
(429, 500, 503, resets before and after the store acted, answers cut in half, slow answers):
extract, tokenize, train (a checkpoint saved, then resumed from), fuse and evaluate all
finish, and every file they write is byte for byte what the same steps write at the same
place without faults and without the resume (wall-clock figures aside)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_proxy import FAULTS, FaultProxy
from corpus_data import whatsnew_paragraphs, write_extracted
from outputs import snapshot

from mtnlg import storage
from mtnlg.cli import main as cli

pytestmark = pytest.mark.e2e

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "python-docs" / "faq"
TRAIN = ["--nproc", "2", "--recipe", "debug", "train.log_every=1", "train.eval_every=2", "train.eval_iters=1",
         "schedule.warmup_steps=1", "schedule.decay_steps=4", "checkpoint.every=2", "model.seq_length=64"]


def _pipeline(root: str, resume: bool, full: bool) -> None:
    """Every step through the CLI, as a user runs them, from ``root/corpus`` into ``root/out``
    (not ``full``: tokenize, train and fuse, from the extracted ``root/extracted``); training
    runs four steps, or (``resume``) two, then resumes from that checkpoint for two more."""
    j = lambda *p: storage.join(root, "out", *p)  # noqa: E731
    extracted = j("extracted") if full else storage.join(root, "extracted")
    if full:
        assert cli(["extract", storage.join(root, "corpus"), "--output", extracted, "--workers", "1",
                    "num_shards=2", "validation_fraction=0.1"]) == 0
    assert cli(["tokenize", extracted, "--output", j("tokens"), "--vocab-size", "512", "--workers", "1"]) == 0
    for steps in ((2, 4) if resume else (4,)):
        assert cli(["train", *TRAIN, f"data.path={j('tokens')}", f"output={j('run')}", f"train.steps={steps}"]) == 0
    assert cli(["fuse", j("run"), "--output", j("model"), "--no-hf"]) == 0
    if full:
        assert cli(["evaluate", j("model"), "--data", j("tokens"), "--output", j("eval"), "--train-log",
                    j("run", "log.jsonl"), "--max-new-tokens", "4", "--max-cloze-items", "20"]) == 0


def _outputs(root: str) -> dict[str, bytes]:
    return snapshot(storage.join(root, "out"))


def _run_twice(root: str, proxy: FaultProxy, full: bool, local: Path) -> tuple[dict, dict]:
    if full:
        for f in sorted(CORPUS.rglob("*")):
            if f.is_file():
                storage.copy(str(f), storage.join(root, "corpus", str(f.relative_to(CORPUS))))
    else:
        docs = whatsnew_paragraphs(max_files=6)
        storage.copy_tree(str(write_extracted(local / "extracted", docs[:-30], docs[-30:])),
                          storage.join(root, "extracted"))
    proxy.fault_rate = proxy.slow_rate = 0.0
    _pipeline(root, resume=False, full=full)
    clean = _outputs(root)
    storage.remove(storage.join(root, "out"))
    assert storage.list_files(storage.join(root, "out")) == []
    proxy.fault_rate, proxy.slow_rate = 0.15, 0.05
    before = proxy.injected
    _pipeline(root, resume=True, full=full)
    assert proxy.injected - before >= 30, proxy.stats  # many faults, of every kind
    assert all(proxy.stats[k] > 0 for k in FAULTS), proxy.stats
    proxy.fault_rate = proxy.slow_rate = 0.0
    faulty = _outputs(root)
    # what the resumed run rightly reports of itself
    summary = json.loads(faulty["run/summary.json"])
    assert summary["resumed_from"].endswith("/run/checkpoints/step_00000002") and summary["steps_this_run"] == 2
    summary.update(resumed_from=None, steps_this_run=4)
    faulty["run/summary.json"] = json.dumps(summary, sort_keys=True).encode()
    # step 2's checkpoint was saved by a run configured for 2 steps: its config says so
    for d in (clean, faulty):
        for name in ("config.yaml", "checksums/rank_00000-side.json"):
            d.pop(f"run/checkpoints/step_00000002/{name}")
    return clean, faulty


# gs://: every step; s3://: the steps that read and write the most (tokenize, train, fuse)
@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_the_pipeline_on_failing_object_storage_writes_what_it_writes_without_faults(store, request, monkeypatch,
                                                                                    tmp_path):
    monkeypatch.setenv("MTNLG_STORAGE_BACKOFF_S", "0.02")  # short waits, still exponential
    root = request.getfixturevalue(store)  # this test's gs://... or s3://... prefix
    upstream = request.getfixturevalue(f"{store}_server")
    env = "STORAGE_EMULATOR_HOST" if store == "gcs" else "AWS_ENDPOINT_URL_S3"
    with FaultProxy(upstream, store, seed=11, slow_s=(0.02, 0.1)) as proxy:
        monkeypatch.setenv(env, proxy.url)  # this process and the training processes it starts
        storage.clear_client_cache()
        try:
            clean, faulty = _run_twice(root, proxy, full=store == "gcs", local=tmp_path)
            # nothing staged was left behind under the outputs
            assert not [f for f in storage.list_files(root) if "/.mtnlg" in f or "/.tokenize-" in f or ".tmp" in f]
        finally:
            storage.clear_client_cache()
    assert sorted(faulty) == sorted(clean)
    assert {"tokens/train.bin", "run/checkpoints/step_00000004/__1_0.distcp", "model/model.safetensors",
            "run/log.jsonl"} <= set(clean)
    assert ("eval/metrics.json" in clean) == (store == "gcs")
    assert [name for name in clean if faulty[name] != clean[name]] == []
