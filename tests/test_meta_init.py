"""Meta-device initialisation (``mtnlg.parallel.init``) on CPU/gloo against the eager path.

One spawn of 4 processes (``tests/meta_init_workers.py``) builds three layouts both ways:
tp=2 + sequence parallel x FSDP2 dp=2; tp=2 x DDP dp=2 (the Llama-style block); pp=2 x 2
virtual stages x tp=2 with tied embeddings. Each rank's shards are bitwise equal after
initialisation, 3 AdamW steps give bitwise equal losses and gradient norms, and the meta path's parameters
occupy exactly their shards (no storage behind a parameter is larger than its slice).
"""

from __future__ import annotations

import pytest
from distributed import run_distributed
from meta_init_workers import four_process_checks

pytestmark = pytest.mark.distributed

LAYOUTS = ["tp2+sp x dp2-fsdp", "tp2 x dp2-ddp llama", "pp2x2 tied x tp2"]


@pytest.fixture(scope="module")
def four():
    return run_distributed(four_process_checks, world_size=4)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_meta_init_equals_eager_init_and_trains_alike(four, layout):
    for rank in four:
        r = rank[layout]
        assert r["same_init"]
        assert r["meta"] == r["eager"]  # losses and gradient norms: the same values, the same ops
        assert len(set(r["meta"][::2])) == 3 and min(r["meta"][1::2]) > 0  # the updates change the model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_rank_holds_only_its_shards(four, layout):
    for rank in four:
        r = rank[layout]
        assert r["storage_bytes"] == r["shard_bytes"]
        assert r["shard_bytes"] < 0.75 * r["whole_bytes"]  # a half or a quarter of the model, plus replicas
