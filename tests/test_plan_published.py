"""The planner against published training runs (``mtnlg.plan.published``): every row
within 15% of its published figure, each fitted constant reproduced from its one row,
and the table in docs/plan.md the one these numbers make."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtnlg.plan.hardware import GPUS, STACK_EFFICIENCY, get_gpu
from mtnlg.plan.published import RUNS, fit_gemm_efficiency, validation_table
from mtnlg.plan.search import layout_problem

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[1] / "docs" / "plan.md"


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_each_published_run_is_predicted_within_fifteen_percent(run):
    e = run.estimate()
    assert run.predicted(e) == pytest.approx(run.value, rel=0.15), \
        f"{run.name}: planner {run.predicted(e):.1f}, published {run.value}"
    if run.gpu == "a100-80g" and run.stack == "megatron-2021":
        # the Megatron layouts ran: the memory model must agree that they fit
        assert e.fits, f"{run.name}: {e.memory.total / 1e9:.1f} GB"


def test_the_rows_span_three_sources_two_gpu_generations_and_most_are_predictions():
    sources = {r.source.split(" ")[0] for r in RUNS}
    assert {"Smith", "Narayanan", "torchtitan"} <= sources
    assert len(RUNS) >= 8 and {r.gpu for r in RUNS} >= {"a100-80g", "h100-96g"}
    fitted = [r for r in RUNS if r.fitted]
    # one fitted row per (GPU kind, stack), no more
    assert len(fitted) == len({(r.gpu, r.stack) for r in RUNS}) == 3
    assert len(RUNS) - len(fitted) >= 15
    # the layouts people ran: pipelined, interleaved, tensor-parallel, FSDP, recomputed
    lays = [r.layout for r in RUNS]
    assert any(lay.pp_virtual > 1 for lay in lays) and any(lay.tp == 8 for lay in lays)
    assert any(lay.fsdp for lay in lays) and {lay.activation_checkpoint for lay in lays} == {"none", "selective",
                                                                                           "full"}


@pytest.mark.parametrize("run", [r for r in RUNS if r.fitted], ids=[r.name for r in RUNS if r.fitted])
def test_each_fitted_constant_is_the_fit_of_its_one_row(run):
    declared = GPUS[run.gpu].gemm_efficiency if run.stack == "torch" else STACK_EFFICIENCY[run.stack][run.gpu]
    assert get_gpu(run.gpu, run.stack).gemm_efficiency == declared
    assert fit_gemm_efficiency(run) == pytest.approx(declared, abs=0.0015)


def test_megatron_layouts_are_valid_for_the_trainers_rules():
    # SC21 and MT-NLG layouts divide as the trainer requires (heads, layers per virtual
    # stage, micro-batches per pipeline)
    for r in RUNS:
        if r.stack == "megatron-2021":
            assert layout_problem(r.model, r.layout, r.global_batch_size) is None, r.name


def test_docs_plan_holds_the_validation_table_as_computed():
    assert validation_table() in DOC.read_text(), "docs/plan.md's table is stale: python -m mtnlg.plan.published"
