"""Tensor x data parallelism on a 2 x 2 mesh of CPU processes (gloo), DDP and FSDP2,
against the single-process model. One spawn of 4 processes (``four_process_checks``).
Tolerances as in test_parallel_tp.py."""

from __future__ import annotations

import pytest
from distributed import run_distributed
from parallel_workers import four_process_checks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results():
    return run_distributed(four_process_checks, world_size=4)[0]


@pytest.mark.parametrize("case", ["ddp/learned", "ddp/llama+sp", "fsdp/learned", "fsdp/llama+sp"])
def test_tp2_x_dp2_grads_match_single_process(results, case):
    check = results["tpxdp"][case]
    assert check["same_names"] and check["ref_grad_max"] > 1e-3
    assert check["worst"] <= 1.0, (case, check)
    assert check["logits"]["worst"] <= 1.0, (case, check["logits"])


@pytest.mark.parametrize("layout", ["tp2xdp2", "tp2xdp2-fsdp+sp+full-ac"])
def test_tp2_x_dp2_training_losses_match_single_process(results, layout):
    single, got = results["train"]["single"], results["train"][layout]
    assert got["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert got["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)


def test_tensor_parallel_groups_are_consecutive_ranks(results):
    # one (pp, dp, tp) mesh with every dimension; here pp=1: rows dp index, columns tp index
    assert results["rank_layout"] == [[[0, 1], [2, 3]]]
