"""Run configuration, LR schedule, batch ramp-up and optimizer groups: no processes started."""

from __future__ import annotations

import math

import pytest

from mtnlg.cli import main as mtnlg_main
from mtnlg.config import ConfigError
from mtnlg.config import load_config
from mtnlg.train.config import TrainRunConfig, recipe, recipe_names
from mtnlg.train.optim import build_optimizer, param_groups
from mtnlg.train.schedule import BatchRampup, LRSchedule
from mtnlg.train.device import PEAK_TFLOPS, resolve_dtype

pytestmark = pytest.mark.unit

REQUIRED = ["data.path=/nonexistent/tok", "output=/nonexistent/run"]


def _load(name, path, overrides):
    return load_config(TrainRunConfig, path, overrides, base=recipe(name))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("override, message", [
    ("train.setps=3", "unknown key 'train.setps'; did you mean 'steps'?"),
    ("optim.learning_rate=1", "unknown key 'optim.learning_rate'"),
    ("train.steps=ten", "train.steps: expected int, got 'ten'"),
    ("train.steps=0", "train.steps: must be >= 1, got 0"),
    ("train.dtype=fp4", "train.dtype: expected one of ['auto', 'fp32', 'bf16', 'fp16', 'fp8'], got 'fp4'"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
    ("optim.min_lr=1", "optim.min_lr=1.0 is larger than optim.lr"),
    ("optim.betas=[0.9]", "optim.betas: expected two numbers in [0, 1)"),
    ("train.global_batch_size=6", "train.global_batch_size=6 is not divisible by train.micro_batch_size=4"),
    ("schedule.decay_steps=5", "schedule.decay_steps=5 must exceed schedule.warmup_steps=5 for cosine decay"),
    ("train.rampup.start=2", "train.rampup.increment=0 (>= 1)"),
    ("model_preset=huge", "model_preset: unknown preset 'huge'"),
    ("model.hidden_size=65", "model.hidden_size=65 is not divisible by model.num_heads=4"),
])
def test_config_rejects_bad_values_naming_them(override, message):
    with pytest.raises(ConfigError) as e:
        _load("debug", None, REQUIRED + [override])
    assert message in str(e.value)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=3"], 3, "model.num_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp * parallel.pp = 2 * 1 = 2"),
    (["parallel.tp=1", "train.global_batch_size=16"], 3,
     "train.global_batch_size=16 is not divisible by train.micro_batch_size=4 x data-parallel degree 3 = 12"),
    (["parallel.tp=1", "train.rampup.start=4", "train.rampup.increment=4", "train.rampup.samples=100"], 2,
     "train.rampup.start=4 is smaller than one micro-batch per data-parallel rank: "
     "train.micro_batch_size=4 x data-parallel degree 2 = 8"),
    (["parallel.tp=1", "parallel.pp=2", "model.tie_embeddings=false", "train.micro_batch_size=8"], 2,
     "parallel.pp_schedule=1f1b needs at least parallel.pp=2 micro-batches per step"),
    (["parallel.tp=1", "parallel.pp=2", "parallel.pp_virtual=2", "model.num_layers=4",
      "train.global_batch_size=20"], 2,
     "parallel.pp_virtual=2: a batch of 20 gives 5 micro-batches, which the interleaved schedules cannot run"),
    (["output="], 2, "output: the run directory is required"),
    (["data.path="], 2, "data.path: the tokenized data directory is required"),
])
def test_impossible_layouts_are_rejected_before_launch(overrides, world, message):
    cfg = _load("debug", None, REQUIRED + overrides)
    with pytest.raises(ConfigError) as e:
        cfg.check_layout(world)
    assert message in str(e.value)


def test_every_recipe_loads_and_fits_its_intended_world():
    worlds = {"debug": 2, "local": 2, "small-20m": 1, "mtnlg-1.3b": 8, "mtnlg-530b": 8 * 35 * 8}
    assert set(worlds) <= set(recipe_names())
    for name, world in worlds.items():
        cfg = _load(name, None, REQUIRED)
        dims = cfg.check_layout(world)
        assert dims.world_size == world
    big = _load("mtnlg-530b", None, REQUIRED)
    assert (big.model.num_layers, big.model.hidden_size, big.model.num_heads) == (105, 20480, 128)
    assert (big.train.rampup.start, big.train.rampup.increment, big.train.global_batch_size) == (32, 32, 1920)


def test_recipe_then_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  steps: 7\n  log_every: 3\noptim:\n  lr: 0.001\n")
    cfg = _load("debug", str(f), REQUIRED + ["train.steps=9", "model.num_layers=3"])
    assert cfg.train.steps == 9            # override beats file
    assert cfg.train.log_every == 3        # file beats recipe
    assert cfg.optim.lr == 0.001
    assert cfg.model.num_layers == 3       # override beats the preset
    assert cfg.model.hidden_size == 64     # from the "debug" preset
    assert cfg.parallel.tp == 2            # from the recipe
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; known recipes: debug"):
        _load("nope", None, REQUIRED)


def test_cli_reports_config_errors_before_launching(tmp_path, capsys):
    out = tmp_path / "run"
    rc = mtnlg_main(["train", "--nproc", "2", "--recipe", "debug", f"data.path={tmp_path}", f"output={out}",
                     "parallel.tp=3"])
    assert rc == 2
    assert "world size 2 is not divisible by parallel.tp * parallel.pp = 3 * 1 = 3" in capsys.readouterr().err
    assert not out.exists()  # nothing started, nothing written
    rc = mtnlg_main(["train", "--recipe", "debug", "train.stpes=3"])
    assert rc == 2
    assert "unknown key 'train.stpes'" in capsys.readouterr().err


def test_print_config_resolves_the_preset(capsys):
    assert mtnlg_main(["train", "--recipe", "small-20m", "--print-config", "train.steps=500"]) == 0
    text = capsys.readouterr().out
    assert "num_layers: 5" in text and "hidden_size: 512" in text and "steps: 500" in text


# ----------------------------------------------------------------------------- schedule


def test_lr_warmup_then_cosine_to_min():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=10, decay="cosine", decay_steps=110)
    assert s(1) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)   # half-way: cos(pi/2) = 0
    assert s(110) == pytest.approx(0.1)
    assert s(1000) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_lr_linear_and_constant():
    lin = LRSchedule(lr=2.0, min_lr=0.0, warmup_steps=0, decay="linear", decay_steps=100)
    assert lin(1) == pytest.approx(2.0 * 99 / 100)
    assert lin(50) == pytest.approx(1.0)
    assert lin(100) == 0.0
    const = LRSchedule(lr=3.0, min_lr=0.0, warmup_steps=4, decay="constant", decay_steps=1)
    assert [const(i) for i in (1, 2, 4, 5, 10_000)] == pytest.approx([0.75, 1.5, 3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="decay_steps"):
        LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=10, decay="cosine", decay_steps=10)


def test_batch_rampup_follows_megatron():
    # Megatron --rampup-batch-size 32 32 1000 with global batch 128: three increments,
    # one every 1000/3 samples.
    r = BatchRampup(global_batch_size=128, start=32, increment=32, samples=1000)
    assert r.batch_size(0) == 32
    assert r.batch_size(333) == 32
    assert r.batch_size(334) == 64
    assert r.batch_size(667) == 96
    assert r.batch_size(999) == 96
    assert r.batch_size(1000) == 128
    assert r.batch_size(10**9) == 128
    consumed, sizes = 0, []
    for _ in range(30):
        sizes.append(r.batch_size(consumed))
        consumed += sizes[-1]
    assert sizes == sorted(sizes) and sizes[0] == 32 and sizes[-1] == 128
    assert r.samples_after(30) == consumed
    assert r.samples_after(5, consumed) == consumed + 5 * 128
    assert BatchRampup(64).batch_size(0) == 64  # disabled
    # MT-NLG's ramp on 350 nodes (dp 10, micro-batch 1): sizes rounded down to a multiple of
    # 10, as Megatron-LM's decrease_batch_size_if_needed; the full batch is kept
    mt = BatchRampup(global_batch_size=1920, start=32, increment=32, samples=5_859_375, unit=10)
    assert mt.batch_size(0) == 30 and mt.batch_size(5_859_375) == 1920
    assert {mt.batch_size(c) % 10 for c in range(0, 5_859_375, 97_001)} == {0}
    with pytest.raises(ValueError, match="unit 7 must divide"):
        BatchRampup(global_batch_size=1920, start=32, increment=32, samples=10, unit=7)
    with pytest.raises(ValueError, match="multiple of the increment"):
        BatchRampup(global_batch_size=100, start=32, increment=32, samples=10)


# ----------------------------------------------------------------------------- optimizer


def test_no_weight_decay_on_norms_and_biases_only():
    from mtnlg.model.gpt import GPT

    cfg = _load("debug", None, REQUIRED).model
    model = GPT(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "layers.0.attention.wq.weight" in decayed
    assert "tok_embeddings.weight" in decayed and "pos_embeddings.weight" in decayed  # as Megatron
    assert "layers.0.attention.wq.bias" in undecayed
    assert "layers.1.mlp_norm.weight" in undecayed and "norm.bias" in undecayed
    assert all(n.endswith(".bias") or p.ndim == 1 for n, p in model.named_parameters() if n in undecayed)
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_dtype_resolution_and_peaks():
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("bf16", "cpu") == "bf16"
    assert PEAK_TFLOPS["H200"]["bf16"] == 989.0 and PEAK_TFLOPS["A100"]["bf16"] == 312.0
    assert math.isfinite(PEAK_TFLOPS["H100"]["fp32"])


def test_named_pipeline_settings_go_over_the_recipe_and_under_the_overrides():
    from mtnlg.config import merge
    from mtnlg.train.config import run_settings

    assert run_settings() == {}                                           # 0 / "" keep the recipe's
    base = merge(recipe("debug"), run_settings(model_preset="tiny", num_layers=3, tp=2, steps=7))
    cfg = load_config(TrainRunConfig, None, REQUIRED + ["train.steps=9"], base=base)
    tiny = load_config(TrainRunConfig, None, REQUIRED + ["model_preset=tiny"], base=recipe("debug"))
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == tiny.model.hidden_size  # preset, then sizes
    assert cfg.parallel.tp == 2 and cfg.train.steps == 9                  # the overrides come last
    from mtnlg.train.config import pipeline_run_config

    same = pipeline_run_config("debug", REQUIRED + ["train.steps=9"], model_preset="tiny", num_layers=3, tp=2,
                               steps=7)
    assert same == cfg                                                    # what the train components load
