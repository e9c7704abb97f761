"""No host-device synchronisation in a training step that does not log.

``train()`` runs in 2 gloo processes under :class:`mtnlg.dist.SyncCounter`, which counts
the tensor reads that would stall a GPU run's host (``.item()``, ``float()``, ``bool()``,
``.tolist()``, ``.numpy()``, data-dependent shapes), per optimizer step: tensor parallel
(tp=2, dropout 0.1) and pipeline parallel (pp=2, tied embeddings). With ``train.log_every=3`` over 6
steps, steps 1, 3 and 6 log (and read their values); steps 2, 4 and 5 must read nothing.
"""

from __future__ import annotations

import pytest
from distributed import run_distributed
from hot_loop_workers import counted_training

pytestmark = pytest.mark.distributed

COMMON = ["train.steps=6", "train.log_every=3", "train.eval_iters=0", "checkpoint.every=0",
          "schedule.decay_steps=20", "train.gc_every=2"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> str:
    from corpus_data import tokenized_dir, whatsnew_paragraphs

    docs = whatsnew_paragraphs(max_files=3)
    cut = len(docs) * 9 // 10
    return tokenized_dir(tmp_path_factory.mktemp("hotdata"), docs[:cut], docs[cut:])


# tp2 with dropout: the per-rank attention-dropout stream draws its seed from the CPU
# generator, which is not a device synchronisation (marked mtnlg.dist.host_side)
LAYOUTS = {"tp2-dropout": ["parallel.tp=2", "model.dropout=0.1", "model.attention_dropout=0.1"],
           "pp2-tied": ["parallel.tp=1", "parallel.pp=2", "model.num_layers=4"]}


@pytest.fixture(scope="module")
def counted(tokenized, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hot")
    runs = [(str(root / name), COMMON + layout) for name, layout in LAYOUTS.items()]
    per_rank = run_distributed(counted_training, world_size=2, args=(tokenized, runs))
    return {name: [r[i] for r in per_rank] for i, name in enumerate(LAYOUTS)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_steps_that_do_not_log_read_nothing_from_the_device(counted, layout):
    for rank, r in enumerate(counted[layout]):
        counts = r["per_step"]
        assert sorted(counts, key=int) == ["1", "2", "3", "4", "5", "6"]
        quiet = {k: (counts[k], r["names"][k]) for k in ("2", "4", "5") if counts[k]}
        assert not quiet, f"rank {rank}: reads in non-logging steps: {quiet}"
        if rank == 0:  # the logging steps do read (the counter sees reads)
            assert counts["3"] > 0 and counts["6"] > 0
