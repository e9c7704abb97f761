"""Parallel degrees, layouts and plans, checked without starting any process."""

from __future__ import annotations

import pytest

from mtnlg.config import ConfigError, load_config
from mtnlg.model.config import ModelConfig
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.dims import ParallelDims

pytestmark = pytest.mark.unit

MODEL = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, seq_length=30,
                    vocab_size=300)


def build(world: int, model: ModelConfig = MODEL, **kw) -> ParallelDims:
    return ParallelDims.build(ParallelConfig(**kw), world, model)


def test_dp_is_inferred_from_the_world_size():
    d = build(8, tp=2)
    assert (d.dp, d.tp, d.pp, d.world_size) == (4, 2, 1, 8)
    assert not d.fsdp and not d.sequence_parallel
    assert build(4, tp=2, dp=2, fsdp=True).fsdp
    assert "world 8 = dp 4 x tp 2 x pp 1, DDP" == build(8, tp=2).describe()


@pytest.mark.parametrize("world, kw, message", [
    (4, {"tp": 4}, "model.num_kv_heads=2 is not divisible by parallel.tp=4"),
    (3, {"tp": 2}, "world size 3 is not divisible by parallel.tp * parallel.pp = 2 * 1 = 2"),
    (8, {"tp": 2, "dp": 2}, "parallel.dp * parallel.tp * parallel.pp = 2 * 2 * 1 = 4, but the world size is 8"),
    (4, {"pp_virtual": 2}, "parallel.pp_virtual=2 needs parallel.pp > 1"),
    (4, {"pp": 2, "pp_virtual": 2}, "model.num_layers=2 is not divisible by parallel.pp=2 x parallel.pp_virtual=2 = 4"),
    (4, {"pp": 2, "pp_virtual": 2, "pp_schedule": "gpipe"}, "parallel.pp_virtual=2 runs interleaved 1F1B"),
    (4, {"pp": 4}, "model.num_layers=2 is not divisible by parallel.pp=4"),
    (6, {"pp": 2, "tp": 2}, "world size 6 is not divisible by parallel.tp * parallel.pp = 2 * 2 = 4"),
    (4, {"pp_schedule": "zb"},
     "pp_schedule: expected one of ['1f1b', 'gpipe', 'interleaved-zb', 'zbv', 'dualpipev'], got 'zb'"),
    (4, {"dp": 0}, "parallel.dp must be -1 (infer) or >= 1, got 0"),
])
def test_invalid_layouts_are_rejected_naming_the_numbers(world, kw, message):
    with pytest.raises(ConfigError) as e:
        build(world, **kw)
    assert message in str(e.value)


def test_divisibility_of_heads_ffn_and_sequence():
    with pytest.raises(ConfigError, match="model.num_heads=6 is not divisible by parallel.tp=4"):
        build(4, ModelConfig(hidden_size=96, num_heads=6), tp=4)
    with pytest.raises(ConfigError, match="model ffn size 100 is not divisible by parallel.tp=8"):
        build(8, ModelConfig(hidden_size=64, num_heads=8, ffn_hidden_size=100), tp=8)
    with pytest.raises(ConfigError, match="model.seq_length=30 is not divisible by parallel.tp=4"):
        build(4, ModelConfig(hidden_size=64, num_heads=4, seq_length=30), tp=4, sequence_parallel=True)
    # the same model without sequence parallelism is fine: only SP splits the sequence
    assert build(4, ModelConfig(hidden_size=64, num_heads=4, seq_length=30), tp=4).tp == 4


def test_no_op_settings_are_dropped_with_a_warning(caplog):
    import logging

    logging.getLogger("mtnlg").propagate = True  # let caplog see mtnlg's logger
    try:
        with caplog.at_level(logging.WARNING):
            d = build(2, tp=1, sequence_parallel=True)
            f = build(2, tp=2, fsdp=True)
    finally:
        logging.getLogger("mtnlg").propagate = False
    assert not d.sequence_parallel and not f.fsdp
    assert "no effect with parallel.tp=1" in caplog.text
    assert "shards nothing" in caplog.text


def test_parallel_config_loads_and_checks_choices():
    cfg = load_config(ParallelConfig, overrides=["tp=2", "sequence_parallel=true",
                                                 "activation_checkpoint=selective"])
    assert (cfg.tp, cfg.dp, cfg.sequence_parallel, cfg.activation_checkpoint) == (2, -1, True, "selective")
    with pytest.raises(ConfigError, match="activation_checkpoint: expected one of"):
        load_config(ParallelConfig, overrides=["activation_checkpoint=some"])
    with pytest.raises(ConfigError, match="tp: must be >= 1, got 0"):
        load_config(ParallelConfig, overrides=["tp=0"])


def test_rank_layout_matches_the_documented_16_rank_example():
    d = build(16, ModelConfig(hidden_size=64, num_heads=4), tp=4)
    assert d.tp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert d.dp_groups() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert d.coordinates(6) == (1, 2)
    with pytest.raises(ValueError, match="rank 16 is outside the world of 16"):
        d.coordinates(16)


def test_tensor_parallel_plan_is_megatrons_split():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    from mtnlg.parallel.tensor_parallel import (
        ReplicateParallel,
        per_rank_dropout_modules,
        tensor_parallel_plan,
    )

    plan = tensor_parallel_plan(MODEL, sequence_parallel=False)
    for name in ("attention.wq", "attention.wk", "attention.wv", "mlp.w_up"):
        assert isinstance(plan["layers.*." + name], ColwiseParallel), name
    for name in ("attention.wo", "mlp.w_down"):
        assert isinstance(plan["layers.*." + name], RowwiseParallel), name
    assert isinstance(plan["tok_embeddings"], RowwiseParallel)
    assert plan["output"].output_layouts == (Shard(-1),) and not plan["output"].use_local_output
    assert isinstance(plan["layers.*.attention_norm"], ReplicateParallel)
    assert "layers.*.mlp.w_gate" not in plan  # GeLU model

    sp = tensor_parallel_plan(MODEL, sequence_parallel=True)
    assert isinstance(sp["layers.*.attention_norm"], SequenceParallel)
    assert isinstance(sp["layers.*.attention"], PrepareModuleInput)
    assert sp["layers.*.attention.wo"].output_layouts == (Shard(1),)
    assert sp["tok_embeddings"].output_layouts == (Replicate(),)  # learned positions added after
    assert isinstance(sp["drop"], PrepareModuleInput)
    rotary = tensor_parallel_plan(ModelConfig(position="rotary", activation="swiglu"), True)
    assert rotary["tok_embeddings"].output_layouts == (Shard(1),)  # reduce-scatter directly
    assert "drop" not in rotary and "layers.*.mlp.w_gate" in rotary

    assert per_rank_dropout_modules(MODEL, False) == ["layers.*.attention.core_attention"]
    assert "layers.*.mlp.dropout" in per_rank_dropout_modules(MODEL, True)


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    import math

    import torch

    from mtnlg.parallel.utils import clip_grad_norm_

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    want = float(torch.nn.utils.clip_grad_norm_(b, 0.5))
    got = float(clip_grad_norm_(a, 0.5))
    assert got == pytest.approx(want, rel=1e-6) and got > 0.5
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
    assert float(clip_grad_norm_(a, 0.0)) == pytest.approx(0.5, rel=1e-5)  # measured only
    a[0].grad[0, 0] = float("nan")
    before = a[1].grad.clone()
    assert math.isnan(clip_grad_norm_(a, 0.5))
    assert torch.equal(a[1].grad, before)  # nothing scaled by a non-finite norm


def test_pipeline_layout_puts_stages_outermost():
    untied = ModelConfig(num_layers=4, hidden_size=64, num_heads=4, seq_length=32, vocab_size=300,
                         tie_embeddings=False)
    d = build(8, untied, tp=2, pp=2)
    assert (d.dp, d.tp, d.pp) == (2, 2, 2)
    assert d.describe() == "world 8 = dp 2 x tp 2 x pp 2, DDP, 2 layers per stage"
    assert d.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.dp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert d.coordinates(6) == (1, 0)
    assert [list(d.stage_layers(s)) for s in range(2)] == [[0, 1], [2, 3]]


# ----------------------------------------------------------------- context parallel

CP_MODEL = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_length=32, vocab_size=300)


def test_context_parallel_sits_between_data_and_tensor_parallel():
    d = build(8, CP_MODEL, tp=2, cp=2)
    assert (d.dp, d.cp, d.tp, d.pp) == (2, 2, 2, 1)
    assert d.describe() == "world 8 = dp 2 x cp 2 x tp 2 x pp 1, DDP"
    assert d.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.cp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.dp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert d.pp_groups() == [[r] for r in range(8)]
    assert [d.coordinates(r) for r in (0, 3, 6)] == [(0, 0), (0, 1), (1, 0)]
    assert [d.cp_coordinate(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert d.as_dict()["cp"] == 2 and "cp" not in build(8, CP_MODEL, tp=2).as_dict()
    # FSDP shards over dp x cp ranks, so dp=1 with cp=2 still shards
    assert build(2, CP_MODEL, cp=2, fsdp=True).fsdp
    # every group partitions the world
    for groups in (d.tp_groups(), d.cp_groups(), d.dp_groups()):
        assert sorted(r for g in groups for r in g) == list(range(8))


@pytest.mark.parametrize("world, model, kw, message", [
    (6, CP_MODEL, {"cp": 4},
     "world size 6 is not divisible by parallel.tp * parallel.pp * parallel.cp = 1 * 1 * 4 = 4"),
    (8, CP_MODEL, {"cp": 2, "dp": 2}, "parallel.dp * parallel.tp * parallel.pp * parallel.cp = 2 * 1 * 1 * 2 = 4, "
                                      "but the world size is 8"),
    (4, MODEL, {"cp": 2}, "model.seq_length=30 is not divisible by 2 * parallel.cp = 4"),
    (8, ModelConfig(num_layers=2, hidden_size=64, num_heads=4, seq_length=20),
     {"cp": 2, "tp": 4, "sequence_parallel": True},
     "model.seq_length / parallel.cp = 20 / 2 = 10 is not divisible by parallel.tp=4"),
    # with pipeline parallelism cp's own rules still hold, and so do the pipeline's
    (8, MODEL, {"cp": 2, "pp": 2}, "model.seq_length=30 is not divisible by 2 * parallel.cp = 4"),
    (12, CP_MODEL, {"cp": 2, "pp": 3}, "model.num_layers=2 is not divisible by parallel.pp=3"),
    (2, CP_MODEL, {"cp": 2, "compile": True}, "parallel.cp=2 with parallel.compile=true"),
    (2, CP_MODEL, {"cp": 0}, "cp: must be >= 1, got 0"),
])
def test_invalid_context_parallel_layouts_name_the_numbers(world, model, kw, message):
    with pytest.raises(ConfigError) as e:
        build(world, model, **kw)
    assert message in str(e.value)


def test_context_parallel_composes_with_pipeline_stages():
    # 8 ranks, pp=2 x cp=2 x tp=2 (dp=1): each stage a block of dp x cp x tp = 4 ranks, with
    # its cp groups inside it; the pipeline groups pair the same (dp, cp, tp) coordinates
    d = build(8, CP_MODEL, tp=2, cp=2, pp=2)
    assert (d.dp, d.cp, d.tp, d.pp) == (1, 2, 2, 2)
    assert d.describe() == "world 8 = dp 1 x cp 2 x tp 2 x pp 2, DDP, 1 layers per stage"
    assert d.cp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert d.pp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [d.cp_coordinate(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    # every schedule, zero-bubble ones included (each tested on 4 gloo ranks, test_context_parallel)
    v = ModelConfig(num_layers=4, hidden_size=64, num_heads=4, seq_length=32, vocab_size=300)
    for schedule in ("1f1b", "gpipe"):
        assert build(4, v, cp=2, pp=2, pp_schedule=schedule).pp == 2
    for schedule in ("1f1b", "interleaved-zb", "zbv", "dualpipev"):
        assert build(4, v, cp=2, pp=2, pp_virtual=2, pp_schedule=schedule).virtual_stages == 2


def test_context_parallel_ranks_share_their_rows():
    # cp ranks read the same rows (each a part of every sequence): the batch unit is
    # micro_batch_size x dp, cp not counted
    d = build(8, CP_MODEL, cp=2)
    assert (d.dp, d.cp) == (4, 2)
    d.check_batches("1f1b", 1, 4)
    with pytest.raises(ConfigError, match="train.global_batch_size=6 is not divisible by train.micro_batch_size=1 "
                                          "x data-parallel degree 4 = 4"):
        d.check_batches("1f1b", 1, 6)
