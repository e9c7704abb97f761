"""The planner (``mtnlg plan``, ``mtnlg train --check``) against published figures and the
trainer's own rules.

The MT-NLG table (Smith et al. 2022, Table 1: 530B, TP 8 x PP 35, global batch 1920,
sequence 2048, DGX A100 80 GB) is held to +-10% on every row, step time and TFLOP/s per
GPU, with the A100's constants declared once in ``mtnlg.plan.hardware``. MT-NLG ran
Megatron's fused softmax (no flash attention) with full activation recomputation.
"""

from __future__ import annotations

import json

import pytest

from mtnlg.cli import main as mtnlg_main
from mtnlg.model.flops import count_parameters
from mtnlg.model.presets import get_preset
from mtnlg.plan.estimate import Layout, Workload, estimate
from mtnlg.plan.hardware import GB, get_gpu
from mtnlg.plan.search import layout_problem, plan

pytestmark = pytest.mark.unit

# GPUs: (seconds per iteration, TFLOP/s per GPU) from the paper
MTNLG_TABLE = {2240: (60.1, 126.0), 2800: (50.2, 121.0), 3360: (44.4, 113.0)}


@pytest.mark.parametrize("gpus", sorted(MTNLG_TABLE))
def test_the_mtnlg_table_is_predicted_within_ten_percent(gpus):
    seconds, tflops = MTNLG_TABLE[gpus]
    lay = Layout(tp=8, pp=35, dp=gpus // 280, activation_checkpoint="full")
    e = estimate(get_preset("mtnlg-530b"), lay, Workload(1920, 2048, flash_attention=False), get_gpu("a100-80g"))
    assert e.time.total == pytest.approx(seconds, rel=0.10)
    assert e.hardware_tflops_per_gpu == pytest.approx(tflops, rel=0.10)
    assert e.fits and e.memory.total < 80 * GB
    # the bubble is the formula's, (p - 1) / (v m + p - 1) with m = 1920 / dp micro-batches
    m = 1920 // (gpus // 280)
    assert e.time.bubble_fraction == pytest.approx(34 / (m + 34))
    assert layout_problem(get_preset("mtnlg-530b"), lay, 1920) is None


def test_the_table_trend_comes_from_the_model_not_per_row_constants():
    # more data-parallel replicas -> fewer micro-batches per pipeline -> more bubble: the
    # TFLOP/s per GPU fall from row to row as the paper's do
    a100 = get_gpu("a100-80g")
    got = [estimate(get_preset("mtnlg-530b"), Layout(tp=8, pp=35, dp=n // 280, activation_checkpoint="full"),
                    Workload(1920, 2048, flash_attention=False), a100).hardware_tflops_per_gpu
           for n in sorted(MTNLG_TABLE)]
    assert got[0] > got[1] > got[2]


def test_weights_gradients_and_optimizer_are_sixteen_bytes_per_parameter():
    cfg = get_preset("mtnlg-1.3b")
    e = estimate(cfg, Layout(tp=1, pp=1, dp=1), Workload(8, 2048), get_gpu("h100"))
    n = count_parameters(cfg)
    assert e.memory.weights == pytest.approx(4 * n)
    assert e.memory.gradients == pytest.approx(4 * n)
    assert e.memory.optimizer == pytest.approx(8 * n)
    # tensor and pipeline parallelism divide the layers' share; FSDP divides the rest by dp
    sharded = estimate(cfg, Layout(tp=2, pp=2, dp=2, fsdp=True), Workload(8, 2048), get_gpu("h100"))
    assert sharded.memory.optimizer < e.memory.optimizer / 6


def test_interleaving_shrinks_the_bubble_v_fold():
    cfg = get_preset("mtnlg-530b")
    w, gpu = Workload(1920, 2048), get_gpu("a100-80g")
    plain = estimate(cfg, Layout(tp=8, pp=35, dp=8, activation_checkpoint="full"), w, gpu)
    inter = estimate(cfg, Layout(tp=8, pp=35, dp=8, virtual_stages=3, activation_checkpoint="full"), w, gpu)
    assert inter.time.bubble == pytest.approx(plain.time.bubble / 3, rel=0.02)
    assert inter.time.pp_comm == pytest.approx(3 * plain.time.pp_comm)
    assert inter.time.total < plain.time.total


def test_plan_ranks_only_valid_layouts_that_fit():
    cfg = get_preset("mtnlg-530b")
    result = plan(cfg, 2240, get_gpu("a100-80g"), Workload(1920, 2048))
    assert len(result.fitting) >= 10 and result.too_big
    times = [e.time.total for e in result.fitting]
    assert times == sorted(times)
    for e in result.fitting:
        assert e.memory.total <= 80 * GB
        assert layout_problem(cfg, e.layout, 1920) is None
    # nothing on one node holds it
    assert not plan(cfg, 8, get_gpu("h200"), Workload(64, 2048)).fitting


def test_plan_cli_table_json_and_pins(capsys):
    assert mtnlg_main(["plan", "--preset", "mtnlg-530b", "--gpus", "2240", "--gpu", "a100-80g",
                       "--global-batch", "1920", "--tp", "8", "--pp", "35"]) == 0
    out = capsys.readouterr().out
    assert "529.58B parameters" in out and "best: tp8 pp35" in out and "MFU %" in out
    assert mtnlg_main(["plan", "model.num_layers=8", "model.hidden_size=1024", "model.num_heads=16",
                       "model.seq_length=1024", "--gpus", "16", "--gpu", "h200", "--global-batch", "64",
                       "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 16 and data["fitting"]
    best = data["fitting"][0]
    assert best["layout"]["tp"] * best["layout"]["pp"] * best["layout"]["dp"] == 16
    assert set(best["time"]) >= {"compute", "tp_comm", "bubble", "pp_comm", "dp_comm", "optimizer", "total"}
    # 128 heads do not split 3 ways: nothing valid, exit 1, the rule named
    assert mtnlg_main(["plan", "--preset", "mtnlg-530b", "--gpus", "2520", "--gpu", "a100-80g",
                       "--global-batch", "1920", "--tp", "3"]) == 1
    assert "model.num_heads=128 is not divisible by parallel.tp=3" in capsys.readouterr().out
    assert mtnlg_main(["plan", "--preset", "debug", "--gpus", "2", "train.steps=3"]) == 2


@pytest.mark.parametrize("gpus, dp, first_batch", [(2240, 8, 32), (2800, 10, 30), (3360, 12, 24)])
def test_the_530b_recipe_validates_at_mtnlg_sizes(gpus, dp, first_batch, capsys):
    assert mtnlg_main(["train", "--recipe", "mtnlg-530b", "--world-size", str(gpus), "--check",
                       "--gpu", "a100-80g"]) == 0
    out = capsys.readouterr().out
    assert f"dp {dp} x tp 8 x pp 35" in out and "fits in 80 GB" in out
    assert f"trained sizes {first_batch}," in out and "fill-drain" in out


def test_train_check_refuses_what_cannot_run(capsys):
    assert mtnlg_main(["train", "--recipe", "mtnlg-530b", "--world-size", "256", "--check"]) == 2
    assert "world size 256 is not divisible by parallel.tp * parallel.pp = 8 * 35 = 280" in capsys.readouterr().err
    # valid, but on one rank per stage without sharding it is over a GPU's memory
    assert mtnlg_main(["train", "--recipe", "mtnlg-530b", "--world-size", "280", "--check", "--gpu", "a100-80g",
                       "parallel.tp=1", "parallel.pp=35", "parallel.sequence_parallel=false"]) == 2
    assert "more than a a100-80g's 80 GB" in capsys.readouterr().err
