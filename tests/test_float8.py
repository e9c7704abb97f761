"""``train.dtype=fp8``: the config rules, the refusal where the hardware lacks float8, and
the conversion of the GPT's linear layers (``mtnlg.parallel.float8``), all on the CPU.

Converting needs no GPU, and torch's ``_scaled_mm`` also runs on the CPU, so the last test
trains the real ``Trainer`` path (meta-device init, conversion, fused AdamW, clipping) in
fp8 on the CPU next to bf16: what a GPU adds is the speed, measured by
``benchmarks/gpu_check.py``'s ``fp8`` section."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from mtnlg.config import ConfigError, load_config
from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT
from mtnlg.train.config import TrainRunConfig, recipe

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao (the fp8 extra) is not installed")

REQUIRED = ["data.path=runs/tok", "output=runs/train"]


def _cfg(overrides: list[str]) -> TrainRunConfig:
    return load_config(TrainRunConfig, None, REQUIRED + overrides, base=recipe("debug"))


# ----------------------------------------------------------------------------- config


@pytest.mark.unit
def test_fp8_is_a_dtype_choice():
    cfg = _cfg(["train.dtype=fp8", "parallel.tp=1", "parallel.pp=2", "parallel.fsdp=true"])
    assert cfg.train.dtype == "fp8"


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["train.device=cpu", "parallel.tp=1"],
     "train.dtype=fp8 with train.device=cpu: float8 training needs a CUDA GPU of compute capability 8.9"),
    (["parallel.tp=2"], "train.dtype=fp8 with parallel.tp=2: float8 under tensor parallelism"),
])
def test_config_refuses_what_fp8_cannot_do(overrides, message):
    with pytest.raises(ConfigError) as e:
        _cfg(["train.dtype=fp8", *overrides])
    assert message in str(e.value)


# ----------------------------------------------------------------------------- hardware


@pytest.mark.unit
def test_refused_without_cuda_naming_the_device_and_the_need():
    from mtnlg.train.device import check_dtype_supported

    check_dtype_supported("bf16", "cpu")  # other dtypes pass untouched
    with pytest.raises(ConfigError) as e:
        check_dtype_supported("fp8", "cpu")
    msg = str(e.value)
    assert "train.dtype=fp8" in msg and "found no CUDA device" in msg and "compute capability 8.9" in msg


@pytest.mark.unit
@pytest.mark.parametrize("capability, name, refused", [
    ((8, 0), "NVIDIA A100-SXM4-80GB", True),
    ((8, 6), "NVIDIA RTX A6000", True),
    ((8, 9), "NVIDIA L40S", False),
    ((9, 0), "NVIDIA H100 80GB HBM3", False),
])
@needs_torchao
def test_refused_below_compute_capability_8_9(monkeypatch, capability, name, refused):
    from mtnlg.train.device import check_dtype_supported

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    if not refused:
        check_dtype_supported("fp8", "cuda")
        return
    with pytest.raises(ConfigError) as e:
        check_dtype_supported("fp8", "cuda")
    assert f"found {name} (compute capability {capability[0]}.{capability[1]})" in str(e.value)
    assert "use train.dtype=bf16" in str(e.value)


@pytest.mark.unit
def test_refused_without_torchao_naming_the_package_and_the_extra(monkeypatch):
    from mtnlg.train.device import check_dtype_supported

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ConfigError) as e:
        check_dtype_supported("fp8", "cuda")
    assert "torchao is not installed" in str(e.value) and "pip install 'mtnlg[fp8]'" in str(e.value)


@pytest.mark.unit
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_train_refuses_fp8_on_the_cpu_before_any_process_group():
    import torch.distributed as dist

    from mtnlg.train.trainer import train

    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match="train.dtype=fp8 needs"):
        train(_cfg(["train.dtype=fp8", "parallel.tp=1"]))
    assert not dist.is_initialized()


@pytest.mark.unit
def test_fp8_mfu_is_against_the_bf16_peak(monkeypatch):
    from mtnlg.train.device import device_peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert device_peak_tflops("cuda", "fp8") == device_peak_tflops("cuda", "bf16") == 989.0


# ----------------------------------------------------------------------------- conversion


@pytest.mark.unit
def test_filter_keeps_the_head_and_dimensions_off_16():
    from mtnlg.parallel.float8 import float8_filter

    assert float8_filter(nn.Linear(64, 128), "layers.0.mlp.w_up")
    assert not float8_filter(nn.Linear(64, 200), "layers.0.mlp.w_up")     # out_features 200
    assert not float8_filter(nn.Linear(200, 64), "layers.0.mlp.w_down")   # in_features 200
    assert not float8_filter(nn.Linear(64, 512), "output")                # the head
    assert not float8_filter(nn.LayerNorm(64), "layers.0.attention_norm")


@pytest.mark.unit
@needs_torchao
def test_conversion_on_the_meta_device_swaps_the_eligible_layers_only():
    from mtnlg.parallel.float8 import convert_to_float8, float8_layers

    # an MLP width of 200 (not a multiple of 16): w_up (200 x 64) and w_down (64 x 200) stay
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_hidden_size=200, seq_length=32,
                      vocab_size=500)
    with torch.device("meta"):
        model = GPT(cfg)
    names = list(model.state_dict())
    params = dict(model.named_parameters())
    converted = convert_to_float8(model)
    expected = [f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wk", "wv", "wo")]
    assert converted == expected and float8_layers(model) == expected
    kept = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert kept == {"output"} | {f"layers.{i}.mlp.{w}" for i in range(2) for w in ("w_up", "w_down")}
    # the same parameters under the same names: checkpoints, FSDP and init see a bf16 model's
    assert list(model.state_dict()) == names
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.output.weight is model.tok_embeddings.weight  # the tie survives


@pytest.mark.unit
@needs_torchao
def test_conversion_refuses_a_model_with_no_eligible_layer():
    from mtnlg.parallel.float8 import convert_to_float8

    cfg = ModelConfig(num_layers=1, hidden_size=40, num_heads=4, seq_length=16, vocab_size=100)
    with torch.device("meta"):
        model = GPT(cfg)
    with pytest.raises(ConfigError, match="no linear layer of this model can train in float8"):
        convert_to_float8(model)


@pytest.mark.unit
@needs_torchao
def test_compiled_float8_blocks_trace_without_graph_breaks():
    """What ``parallel.compile=true`` does to a float8 model (per-block compile), traced by
    Dynamo and AOT autograd (``aot_eager``: no inductor code generation on the CPU)."""
    from mtnlg.model.presets import get_preset
    from mtnlg.parallel.float8 import convert_to_float8

    cfg = get_preset("debug")
    models = []
    for compiled in (False, True):
        model = GPT(cfg)
        model.init_weights(seed=1)
        convert_to_float8(model)
        if compiled:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            for block in model.layers:
                block.compile(backend="aot_eager")
        models.append(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=torch.Generator().manual_seed(0))
    outs = []
    for model in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens)
        out.float().mean().backward()
        outs.append((out.float(), model.layers[0].mlp.w_up.weight.grad))
    counters = torch._dynamo.utils.counters
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-2, atol=1e-4)


# ----------------------------------------------------------------------------- training


def _token_dir(root, vocab: int = 256, n: int = 40_000) -> str:
    from mtnlg.formats.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    # a learnable stream: each token is the previous one plus 1 or 2 (mod vocab)
    tokens = np.cumsum(rng.integers(1, 3, n)) % vocab
    for split in ("train", "validation"):
        with IndexedDatasetBuilder(str(root / split), np.uint16) as b:
            b.add_documents(tokens, np.full(n // 500, 500, dtype=np.int64))
    (root / "tokenizer.json").write_text(json.dumps({"vocab_size": vocab, "eod_id": 2}))
    return str(root)


def _run_cfg(data: str, out: str, dtype: str, extra: list[str]) -> TrainRunConfig:
    return load_config(TrainRunConfig, None, [
        f"data.path={data}", f"output={out}", f"train.dtype={dtype}", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.eval_iters=0", "train.prefetch=false", "model.seq_length=32",
        "model.vocab_size=256", "optim.lr=3e-3", "schedule.warmup_steps=0", "train.steps=100", *extra],
        base=recipe("debug"))


def _layout_losses(rank: int, world: int, data: str, out: str, layouts: dict) -> dict:
    """Per process: bf16 and fp8 losses of each layout, and how many float8 layers the
    rank's part of the model holds."""
    from mtnlg.dist import init_process_group
    from mtnlg.parallel.float8 import float8_layers
    from mtnlg.train.trainer import Trainer

    result = {}
    for name, extra in layouts.items():
        for dtype in ("bf16", "fp8"):
            trainer = Trainer(_run_cfg(data, f"{out}/{name}-{dtype}", dtype, extra), init_process_group("cpu"), "cpu")
            result[f"{name}-{dtype}"] = {"float8_layers": len(float8_layers(trainer.engine.model)),
                                         "losses": [float(trainer.optimizer_step(False).loss) for _ in range(3)]}
    return result


@needs_torchao
@pytest.mark.distributed
def test_fp8_under_fsdp2_and_pipeline_parallelism(tmp_path):
    """Converted before FSDP2 shards and before the pipeline split: each layout trains its
    float8 layers (2 gloo processes) and follows its bf16 run."""
    from distributed import run_distributed

    layouts = {"fsdp-dp2": ["parallel.tp=1", "parallel.fsdp=true"],
               "pp2": ["parallel.tp=1", "parallel.pp=2", "model.num_layers=4"]}
    ranks = run_distributed(_layout_losses, world_size=2, args=(_token_dir(tmp_path), str(tmp_path), layouts))
    for name in layouts:
        for r in ranks:  # fsdp: every block on each rank; pp2: 2 of the 4 blocks per stage
            assert r[f"{name}-fp8"]["float8_layers"] == 2 * 6 and r[f"{name}-bf16"]["float8_layers"] == 0
        bf16, fp8 = np.array(ranks[0][f"{name}-bf16"]["losses"]), np.array(ranks[0][f"{name}-fp8"]["losses"])
        assert np.all(np.isfinite(fp8)) and np.max(np.abs(fp8 - bf16)) < 0.01 * bf16[0], (name, bf16, fp8)


@pytest.mark.unit
@needs_torchao
def test_fp8_trains_the_trainer_path_like_bf16(tmp_path):
    """The run's own path (meta init, conversion in build_engine, materialize, fused AdamW,
    clipping) in fp8 against bf16 from the same seed and data, on the CPU (``Trainer``
    built directly: ``train()`` refuses fp8 there)."""
    import torch.distributed as dist

    from mtnlg.dist import init_process_group
    from mtnlg.parallel.float8 import float8_layers
    from mtnlg.train.trainer import Trainer

    data = _token_dir(tmp_path)
    losses = {}
    for dtype in ("bf16", "fp8"):
        cfg = _run_cfg(data, f"{tmp_path}/{dtype}", dtype, ["parallel.tp=1", "train.global_batch_size=4",
                                                            "train.micro_batch_size=4"])
        env = init_process_group("cpu")
        try:
            trainer = Trainer(cfg, env, "cpu")
            n_float8 = len(float8_layers(trainer.engine.model))
            assert n_float8 == (2 * 6 if dtype == "fp8" else 0)  # 2 blocks x wq wk wv wo w_up w_down
            losses[dtype] = [float(trainer.optimizer_step(False).loss) for _ in range(6)]
        finally:
            dist.destroy_process_group()
    bf16, fp8 = np.array(losses["bf16"]), np.array(losses["fp8"])
    assert np.all(np.isfinite(fp8)) and fp8[-1] < fp8[0] - 0.1  # it learns
    assert np.max(np.abs(fp8 - bf16)) < 0.05 * bf16[0], (bf16, fp8)
