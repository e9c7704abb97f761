"""The planner (``mtnlg plan``, ``mtnlg train --check``): its model term by term, the
search over layouts, the command line and its JSON document. The published runs it is
validated against are in ``tests/test_plan_published.py``."""

from __future__ import annotations

import json

import pytest

from mtnlg.cli import main as mtnlg_main
from mtnlg.config import ConfigError
from mtnlg.model.config import ModelConfig
from mtnlg.model.flops import count_parameters
from mtnlg.model.presets import get_preset
from mtnlg.plan.estimate import (Layout, Workload, estimate, gathered_kv_bytes, layer_activation_bytes,
                                 pipeline_bubble)
from mtnlg.plan.hardware import GB, get_gpu
from mtnlg.plan.report import (ESTIMATE_FIELDS, LAYOUT_FIELDS, MEMORY_FIELDS, SCHEMA, TIME_FIELDS,
                               TOP_FIELDS)
from mtnlg.plan.search import Choices, layout_problem, plan, trainer_gap

pytestmark = pytest.mark.unit

MTNLG = dict(tp=8, pp=35, dp=8, activation_checkpoint="full", flash_attention=False, sequence_parallel=False)


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


def test_activations_are_korthikantis_34_sbh_plus_5_as2b_for_the_gpt_block():
    # Korthikanti et al. 2022, Table 2: sbh (34 + 5as/h) per layer without parallelism,
    # sbh (10 + 24/t + 5as/(ht)) with tensor parallelism alone, sbh (34/t + 5as/(ht)) with
    # sequence parallelism
    cfg = get_preset("mtnlg-530b")
    s, b, h, a = 2048, 1, 20480, 128
    acts, scores = layer_activation_bytes(cfg, Layout(tp=1, pp=1, dp=1, flash_attention=False), s)
    assert acts == pytest.approx(34 * s * b * h) and scores == pytest.approx(5 * a * s * s * b)
    acts, scores = layer_activation_bytes(cfg, Layout(tp=8, pp=1, dp=1, flash_attention=False,
                                                      sequence_parallel=False), s)
    assert acts == pytest.approx(s * b * h * (10 + 24 / 8)) and scores == pytest.approx(5 * a * s * s * b / 8)
    acts, scores = layer_activation_bytes(cfg, Layout(tp=8, pp=1, dp=1), s)
    assert acts == pytest.approx(s * b * h * 34 / 8) and scores == 0.0
    # context parallelism divides what each rank keeps by cp
    assert layer_activation_bytes(cfg, Layout(tp=8, pp=1, dp=1, cp=4), s)[0] == pytest.approx(acts / 4)
    # a SwiGLU block without dropout keeps its gate, up, SiLU and product (8f) instead of 4f + masks
    llama = ModelConfig(num_layers=2, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                        activation="swiglu", norm="rmsnorm", position="rotary", bias=False, seq_length=8192)
    acts, _ = layer_activation_bytes(llama, Layout(tp=1, pp=1, dp=1), 8192)
    per_token = 2 * 4096 + 2 * (4096 + 2 * 1024) + 2 * 4096 + 2 * 4096 + 8 * 14336 + 4 * 4096
    assert acts == pytest.approx(8192 * per_token)


def test_interleaving_shrinks_the_bubble_v_fold():
    cfg = get_preset("mtnlg-530b")
    w, gpu = Workload(1920, 2048), get_gpu("a100-80g")
    plain = estimate(cfg, Layout(**MTNLG), w, gpu)
    inter = estimate(cfg, Layout(**{**MTNLG, "pp_virtual": 3}), w, gpu)
    assert plain.time.bubble_fraction == pytest.approx(34 / (240 + 34))
    assert inter.time.bubble == pytest.approx(plain.time.bubble / 3, rel=0.02)
    assert inter.time.pp_comm == pytest.approx(3 * plain.time.pp_comm)
    assert inter.time.total < plain.time.total


def test_zero_bubble_schedules_take_the_weight_gradients_out_of_the_bubble():
    # ZB-H1's (p-1)(F+B-W) per chunk against 1F1B's (p-1)(F+B+W); ZB-V and DualPipeV as
    # torch.distributed.pipelining's plans run them (benchmarks/pipeline_bubble.py)
    cfg = get_preset("mtnlg-530b")
    w, gpu = Workload(1920, 2048), get_gpu("a100-80g")
    lay = {**MTNLG, "activation_checkpoint": "none", "flash_attention": True, "sequence_parallel": True}
    one = estimate(cfg, Layout(**lay), w, gpu).time
    inter = estimate(cfg, Layout(**lay, pp_virtual=3), w, gpu).time
    izb = estimate(cfg, Layout(**lay, pp_schedule="interleaved-zb", pp_virtual=3), w, gpu).time
    zbv = estimate(cfg, Layout(**lay, pp_schedule="zbv", pp_virtual=2), w, gpu).time
    dpv = estimate(cfg, Layout(**lay, pp_schedule="dualpipev", pp_virtual=2), w, gpu).time
    assert 0 < izb.bubble < inter.bubble / 2 < one.bubble
    assert 0 < zbv.bubble < inter.bubble and dpv.bubble == pytest.approx(zbv.bubble)  # 240 >= 2p micro-batches
    assert izb.compute == one.compute            # the same work, rescheduled
    # with F = B = W: ZB-H1's bubble is a third of 1F1B's (over v chunks); ZB-V keeps p-1
    # start-up passes of a sixth of a stage's micro-batch, more with fewer than 2p-1
    # micro-batches; DualPipeV from 2p micro-batches, and runs ZB-V below
    zb1 = Layout(**{**lay, "pp_virtual": 1}, pp_schedule="1f1b")
    assert pipeline_bubble(zb1, 3.0, 1.0, 1.0, 70) == pytest.approx(34 * 3.0)
    assert pipeline_bubble(Layout(**lay, pp_schedule="interleaved-zb", pp_virtual=3), 3.0, 1.0, 1.0, 70) == \
        pytest.approx(34 * 1.0 / 3)
    for v_schedule in ("zbv", "dualpipev"):
        v_lay = Layout(**lay, pp_schedule=v_schedule, pp_virtual=2)
        assert pipeline_bubble(v_lay, 3.0, 1.0, 1.0, 70) == pytest.approx(34 * 0.5)
        assert pipeline_bubble(v_lay, 3.0, 1.0, 1.0, 10) == pytest.approx(2 * (69 - 10) * 0.5)
    with pytest.raises(ConfigError, match="zbv runs exactly 2 model chunks per rank"):
        Layout(**lay, pp_schedule="zbv", pp_virtual=3)
    with pytest.raises(ConfigError, match="interleaved-zb runs virtual stages"):
        Layout(**lay, pp_schedule="interleaved-zb")
    with pytest.raises(ConfigError, match="pp_schedule='pipedream' is not one of"):
        Layout(**lay, pp_schedule="pipedream")


def test_context_parallelism_splits_the_sequence_and_pays_for_the_kv_gathers():
    llama = ModelConfig(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                        activation="swiglu", norm="rmsnorm", position="rotary", bias=False, tie_embeddings=False,
                        seq_length=131072, vocab_size=128256)
    w, gpu = Workload(8, 131072), get_gpu("h100")
    base = dict(tp=8, pp=1, micro_batch_size=1, activation_checkpoint="full", fsdp=True)
    cp1 = estimate(llama, Layout(dp=8, cp=1, **base), w, gpu)
    cp8 = estimate(llama, Layout(dp=1, cp=8, **base), w, gpu)
    assert cp1.layout.world_size == cp8.layout.world_size == 64
    # each rank holds 1/8 of every sequence: activations shrink 8-fold, the step's FLOPs are shared
    assert cp8.memory.activations < cp1.memory.activations / 6
    assert cp1.time.cp_comm == 0.0
    # tp 8 x cp 8 spans nodes: K and V are all-gathered over InfiniBand, twice forward under
    # full recomputation and their gradients reduce-scattered once: (2 + 1) x 32 layers x
    # (cp - 1) x this rank's K and V; at 128k tokens that is small next to the attention
    kv = 2 * (131072 / 8) * (8 * 128) / 8 * 2
    assert cp8.time.cp_comm == pytest.approx(8 * 3 * 32 * 7 * kv / (gpu.ib_gbps * 1e9), rel=1e-6)
    assert 0.0 < cp8.time.cp_comm < 0.2 * cp8.time.compute
    # the attention holds the whole sequence's K and V (repeated to the 32 query heads) beyond
    # its own eighth: kept without recomputation, in the recomputed layer's peak with it
    gathered = gathered_kv_bytes(llama, Layout(dp=1, cp=8, **base), 131072)
    assert gathered == pytest.approx(2 * 2 * 131072 * 7 / 8 * 4096 / 8)
    none = estimate(llama, Layout(dp=1, cp=8, **{**base, "activation_checkpoint": "none"}), w, gpu)
    no_cp = layer_activation_bytes(llama, Layout(dp=1, cp=8, **base), 131072)
    assert none.memory.activations >= 32 * (no_cp[0] + gathered)
    short = ModelConfig(**{**llama.__dict__, "seq_length": 4096})
    # the trainer runs cp with and without pipeline parallelism
    assert trainer_gap(cp8.layout) is None
    assert layout_problem(short, Layout(dp=1, cp=8, **{**base, "tp": 8}), 8) is None
    piped = Layout(dp=1, cp=8, **{**base, "tp": 4, "pp": 2})
    assert layout_problem(short, piped, 8) is None
    assert trainer_gap(piped) is None
    # the trainer's own rules, with its messages: ParallelDims checks cp's sequence rules
    odd = ModelConfig(**{**llama.__dict__, "seq_length": 4100})
    assert "model.seq_length=4100 is not divisible by 2 * parallel.cp = 16" in \
        layout_problem(odd, Layout(dp=4, cp=8, **{**base, "tp": 2}), 8)
    # ... also for a layout with pipeline parallelism
    assert "model.seq_length=4100 is not divisible by 2 * parallel.cp = 16" in \
        layout_problem(odd, Layout(dp=2, cp=8, **{**base, "tp": 2, "pp": 2}), 8)
    assert "model.num_layers=32 is not divisible by parallel.pp=3" in \
        layout_problem(short, Layout(dp=1, cp=2, **{**base, "tp": 1, "pp": 3}), 8)
    sp = ModelConfig(**{**llama.__dict__, "seq_length": 4112})     # 4112 / 8 = 514, not divisible by tp=4
    assert "model.seq_length / parallel.cp = 4112 / 8 = 514 is not divisible by parallel.tp=4" in \
        layout_problem(sp, Layout(dp=1, cp=8, **{**base, "tp": 4, "pp": 2}), 8)


def test_plan_ranks_only_valid_layouts_that_fit():
    cfg = get_preset("mtnlg-530b")
    result = plan(cfg, 2240, get_gpu("a100-80g"), Workload(1920, 2048))
    assert len(result.fitting) >= 10 and result.too_big
    times = [e.time.total for e in result.fitting]
    assert times == sorted(times)
    for e in result.fitting:
        assert e.memory.total <= 80 * GB
        assert layout_problem(cfg, e.layout, 1920) is None
        assert trainer_gap(e.layout) is None      # without explore: only what mtnlg train runs
    # nothing on one node holds it
    assert not plan(cfg, 8, get_gpu("h200"), Workload(64, 2048)).fitting


def test_pinned_choices_restrict_the_walk_and_explore_adds_what_if_layouts():
    cfg = get_preset("mtnlg-1.3b")
    gpu, w = get_gpu("h100"), Workload(256, 2048)
    pinned = plan(cfg, 16, gpu, w, Choices(tp=2, activation_checkpoint="selective", fsdp=True))
    assert pinned.fitting
    assert {(e.layout.tp, e.layout.activation_checkpoint, e.layout.fsdp) for e in pinned.fitting} \
        == {(2, "selective", True)}
    explored = plan(cfg, 16, gpu, w, explore=True)
    assert {e.layout.cp for e in explored.fitting} >= {1, 2}
    assert {e.layout.pp_schedule for e in explored.fitting} >= {"1f1b", "interleaved-zb", "zbv", "dualpipev"}
    assert any(trainer_gap(e.layout) for e in explored.fitting)


def test_plan_cli_ranks_evaluates_one_layout_and_refuses_with_the_rule(capsys):
    assert mtnlg_main(["plan", "--preset", "mtnlg-530b", "--gpus", "2240", "--gpu", "a100-80g",
                       "--global-batch", "1920", "--tp", "8", "--pp", "35"]) == 0
    out = capsys.readouterr().out
    assert "529.58B parameters" in out and "best: tp8 pp35" in out and "MFU %" in out
    # every choice given: that one layout, term by term
    one = ["plan", "--preset", "mtnlg-530b", "--nodes", "280", "--gpu", "a100-80g", "--global-batch", "1920",
           "--tp", "8", "--pp", "35", "--cp", "1", "--pp-virtual", "1", "--pp-schedule", "1f1b",
           "--micro-batch-size", "1", "--activation-checkpoint", "full", "--no-flash-attention", "--no-fsdp"]
    assert mtnlg_main(one) == 0
    out = capsys.readouterr().out
    assert "2240 x a100-80g" in out and "tp8 pp35 dp8 mb1, 1f1b schedule, recompute full" in out
    assert "what-if: mtnlg train does not run attention without a fused kernel" in out
    assert "step " in out and "+ bubble " in out and "fits in 80 GB" in out
    # 128 heads do not split 3 ways: nothing valid, exit 1, the rule named
    assert mtnlg_main(["plan", "--preset", "mtnlg-530b", "--gpus", "2520", "--gpu", "a100-80g",
                       "--global-batch", "1920", "--tp", "3"]) == 1
    assert "model.num_heads=128 is not divisible by parallel.tp=3" in capsys.readouterr().out
    # one layout the rules refuse: exit 2 naming the rule; GPUs that do not divide: exit 2
    assert mtnlg_main([*one[:one.index("--tp")], "--tp", "8", "--pp", "35", "--cp", "1", "--pp-virtual", "2",
                       "--pp-schedule", "1f1b", "--micro-batch-size", "1", "--activation-checkpoint", "full",
                       "--flash-attention", "--no-fsdp"]) == 2
    assert "model.num_layers=105 is not divisible by parallel.pp=35 x parallel.pp_virtual=2" in \
        capsys.readouterr().err
    assert mtnlg_main(["plan", "--preset", "mtnlg-1.3b", "--gpus", "12", "--tp", "8", "--pp", "1", "--cp", "1",
                       "--pp-virtual", "1", "--pp-schedule", "1f1b", "--micro-batch-size", "1",
                       "--activation-checkpoint", "none", "--flash-attention", "--fsdp"]) == 2
    assert "12 GPUs are not divisible by tp x cp x pp = 8 x 1 x 1 = 8" in capsys.readouterr().err
    assert mtnlg_main(["plan", "--preset", "debug", "--gpus", "2", "train.steps=3"]) == 2
    assert mtnlg_main(["plan", "--preset", "debug"]) == 2
    assert "give the GPUs: --gpus N or --nodes N" in capsys.readouterr().err
    assert mtnlg_main(["plan", "--preset", "debug", "--gpus", "8", "--nodes", "2"]) == 2
    assert "--gpus 8 disagrees with --nodes 2 x 8 GPUs per node = 16" in capsys.readouterr().err


def test_plan_cli_stack_and_bad_values_name_what_is_wrong(capsys):
    # MT-NLG's layout on Megatron-LM's 2021 stack: the validation table's prediction
    mtnlg = ["plan", "--preset", "mtnlg-530b", "--nodes", "280", "--gpu", "a100-80g", "--stack", "megatron-2021",
             "--global-batch", "1920", "--tp", "8", "--pp", "35", "--cp", "1", "--pp-virtual", "1",
             "--pp-schedule", "1f1b", "--micro-batch-size", "1", "--activation-checkpoint", "full",
             "--no-flash-attention", "--no-fsdp", "--no-sequence-parallel"]
    assert mtnlg_main(mtnlg) == 0
    out = capsys.readouterr().out
    assert "at 56.7%" in out and "133 hardware TFLOP/s per GPU" in out
    assert mtnlg_main([*mtnlg[:mtnlg.index("--gpu") + 1], "h100", *mtnlg[mtnlg.index("--gpu") + 2:]]) == 2
    assert "no gemm_efficiency is fitted for h100 under the megatron-2021 stack" in capsys.readouterr().err
    assert mtnlg_main(["plan", "--preset", "debug", "--gpus", "8", "--tp", "0"]) == 2
    assert "--tp must be >= 1, got 0" in capsys.readouterr().err
    assert mtnlg_main(["plan", "--preset", "debug", "--gpus", "8", "--gpus-per-node", "0"]) == 2
    assert "--gpus-per-node must be >= 1, got 0" in capsys.readouterr().err
    assert mtnlg_main(["plan", "--preset", "mtnlg-1.3b", "--gpus", "16", "--pp-schedule", "zbv",
                       "--pp-virtual", "3"]) == 2
    assert "pp_schedule=zbv runs exactly 2 model chunks per rank (a V); got pp_virtual=3" in capsys.readouterr().err
    assert mtnlg_main(["plan", "--preset", "mtnlg-1.3b", "--gpus", "16", "--cp", "3"]) == 2
    assert "16 GPUs are not divisible by the given degrees tp x cp x pp x dp = 3" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown software stack 'jax'"):
        get_gpu("a100-80g", "jax")
    # a node of 4 GPUs: tensor parallelism stays inside it
    assert mtnlg_main(["plan", "--preset", "mtnlg-1.3b", "--nodes", "4", "--gpus-per-node", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 16 and data["gpus_per_node"] == 4
    assert max(e["layout"]["tp"] for e in data["fitting"]) == 4


def test_plan_json_field_names_are_the_documented_ones(capsys):
    # the --json document is an interface: these names are docs/plan.md's table, and a
    # change to them is a change to report.SCHEMA
    assert TOP_FIELDS == ("schema", "mode", "gpu", "gpus", "nodes", "gpus_per_node", "parameters", "seq_length",
                          "global_batch", "estimate", "problem", "fitting", "too_big", "invalid")
    assert ESTIMATE_FIELDS == ("layout", "memory", "time", "bubble_fraction", "micro_batches", "tokens_per_step",
                               "tokens_per_second", "tokens_per_second_per_gpu", "model_tflops_per_gpu",
                               "hardware_tflops_per_gpu", "mfu", "peak_tflops", "fits", "runs_in_trainer",
                               "trainer_gap")
    assert LAYOUT_FIELDS == ("tp", "pp", "dp", "cp", "pp_virtual", "pp_schedule", "schedule", "micro_batch_size",
                             "activation_checkpoint", "flash_attention", "fsdp", "fsdp_grad_sync",
                             "sequence_parallel")
    assert MEMORY_FIELDS == ("weights", "gradients", "optimizer", "weight_copies", "activations", "buffers",
                             "total")
    assert TIME_FIELDS == ("compute", "tp_comm", "cp_comm", "bubble", "pp_comm", "dp_comm", "optimizer", "total")
    assert SCHEMA == "mtnlg.plan/1"
    assert mtnlg_main(["plan", "model.num_layers=8", "model.hidden_size=1024", "model.num_heads=16",
                       "model.seq_length=1024", "--gpus", "16", "--gpu", "h200", "--global-batch", "64",
                       "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == set(TOP_FIELDS) and data["mode"] == "rank" and data["schema"] == SCHEMA
    assert data["gpus"] == 16 and data["nodes"] == 2 and data["fitting"]
    best = data["fitting"][0]
    assert set(best) == set(ESTIMATE_FIELDS)
    assert set(best["layout"]) == set(LAYOUT_FIELDS) and set(best["memory"]) == set(MEMORY_FIELDS)
    assert set(best["time"]) == set(TIME_FIELDS)
    assert best["layout"]["tp"] * best["layout"]["pp"] * best["layout"]["dp"] * best["layout"]["cp"] == 16
    assert best["time"]["total"] == pytest.approx(sum(v for k, v in best["time"].items() if k != "total"))
    assert best["tokens_per_second"] == pytest.approx(64 * 1024 / best["time"]["total"])
    # one layout: the same fields, under "estimate" as well
    assert mtnlg_main(["plan", "--preset", "mtnlg-1.3b", "--gpus", "16", "--gpu", "h100", "--global-batch", "256",
                       "--tp", "2", "--pp", "2", "--cp", "2", "--pp-virtual", "2", "--pp-schedule", "zbv",
                       "--micro-batch-size", "1", "--recompute", "selective", "--flash-attention", "--fsdp",
                       "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "evaluate" and data["problem"] is None and set(data["estimate"]) == set(ESTIMATE_FIELDS)
    est = data["estimate"]
    assert est["layout"]["schedule"] == "zbv" and est["layout"]["dp"] == 2
    assert est["runs_in_trainer"] is False and est["trainer_gap"] == "the zbv schedule with FSDP"
    assert data["fitting"] == [est]


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


def test_the_walk_keeps_what_the_trainer_lacks_only_when_pinned_or_explored():
    cfg = get_preset("mtnlg-1.3b")
    gpu, w = get_gpu("h100"), Workload(256, 2048)
    # cp pinned, pp free: the trainer runs cp with pipeline stages too, so pp > 1 is walked
    cp2 = plan(cfg, 16, gpu, w, Choices(cp=2))
    assert cp2.fitting and {e.layout.cp for e in cp2.fitting} == {2}
    assert {e.layout.pp for e in cp2.fitting + cp2.too_big} > {1}
    assert all(trainer_gap(e.layout) is None for e in cp2.fitting + cp2.too_big)
    # both pinned: the pair runs, checked by the trainer's rules as one layout
    piped = plan(cfg, 16, gpu, w, Choices(cp=2, pp=2))
    assert piped.fitting and not piped.invalid
    assert all(trainer_gap(e.layout) is None for e in piped.fitting)
    # a zero-bubble schedule with FSDP, which the trainer refuses: left out unless fsdp is pinned
    zb = plan(cfg, 16, gpu, w, Choices(pp=2, pp_schedule="zbv"))
    assert zb.fitting and all(trainer_gap(e.layout) is None for e in zb.fitting)
    assert not any(e.layout.fsdp for e in zb.fitting + zb.too_big)
    assert not any("wrong gradients" in p for p in zb.problems)
    zbf = plan(cfg, 16, gpu, w, Choices(pp=2, pp_schedule="zbv", fsdp=True))
    # (with dp=1 FSDP shards nothing: the trainer runs the layout without it)
    assert {trainer_gap(e.layout) for e in zbf.fitting if e.layout.dp > 1} == {"the zbv schedule with FSDP"}
    assert {trainer_gap(e.layout) for e in zbf.fitting if e.layout.dp == 1} == {None}
    # explore walks cp, with pipelines too, and those the trainer runs
    explored = plan(cfg, 16, gpu, w, Choices(pp=2), explore=True)
    assert any(e.layout.cp > 1 and trainer_gap(e.layout) is None for e in explored.fitting)


def test_train_check_with_cp_estimates_the_cp_layout(capsys):
    base = ["train", "--recipe", "mtnlg-1.3b", "--check", "--gpu", "h100"]
    assert mtnlg_main([*base, "--world-size", "8"]) == 0
    cp1 = capsys.readouterr().out
    assert mtnlg_main([*base, "--world-size", "16", "parallel.cp=2"]) == 0
    cp2 = capsys.readouterr().out
    assert "world 16 = dp 8 x cp 2 x tp 1 x pp 1" in cp2

    def activations(out: str) -> float:
        return float(out.split("activations ")[1].split(",")[0])

    # the same dp=8 and batch, each sequence split over 2 ranks: half the activations
    assert activations(cp2) == pytest.approx(activations(cp1) / 2, rel=0.02)
    # with a pipeline as well: the trainer runs it, and --check estimates it
    assert mtnlg_main([*base, "--world-size", "16", "parallel.cp=2", "parallel.pp=2"]) == 0
    piped = capsys.readouterr().out
    assert "world 16 = dp 4 x cp 2 x tp 1 x pp 2" in piped and "fits in 80 GB" in piped
