"""The single-device GPT: config rules, presets, parameter/FLOP counts, attention and
position maths against explicit formulas, initialisation, causality, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from parallel_workers import TINY, VARIANTS

from mtnlg.config import ConfigError, load_config
from mtnlg.model import GPT, PRESETS, ModelConfig, count_parameters, flops_per_token, get_preset
from mtnlg.model.gpt import CoreAttention, apply_rotary, rope_table, sinusoidal_table

pytestmark = pytest.mark.unit


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


# ---- config -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"hidden_size": 65}, "model.hidden_size=65 is not divisible by model.num_heads=4"),
    ({"num_kv_heads": 3}, "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    ({"num_kv_heads": 8}, "model.num_kv_heads=8 must be between 1 and model.num_heads=4"),
    ({"hidden_size": 24, "num_heads": 8, "position": "rotary"}, "even head size"),
    ({"dropout": 1.0}, "dropout: must be <= 0.99, got 1.0"),
])
def test_config_rejects_inconsistent_sizes_naming_the_numbers(kw, message):
    with pytest.raises(ConfigError) as e:
        tiny(**kw)
    assert message in str(e.value)


def test_config_loads_from_overrides_and_derives_sizes():
    cfg = load_config(ModelConfig, overrides=["hidden_size=128", "num_heads=8", "activation=swiglu",
                                              "num_kv_heads=2"])
    assert (cfg.head_dim, cfg.kv_heads, cfg.ffn_size) == (16, 2, 384)  # 8*128/3 -> 384
    assert tiny().ffn_size == 256
    with pytest.raises(ConfigError, match="position: expected one of"):
        load_config(ModelConfig, overrides=["position=alibi"])


def test_padded_vocab_size_is_a_multiple_of_divisor_times_tp():
    cfg = ModelConfig(vocab_size=50257, make_vocab_size_divisible_by=128)
    assert cfg.padded_vocab_size(1) == 50304
    assert cfg.padded_vocab_size(8) == 51200
    assert GPT(tiny(), tp=2).tok_embeddings.weight.shape[0] == 304  # 300 -> multiple of 16


# ---- presets and counts --------------------------------------------------------------------

def test_presets_include_mtnlg_shapes():
    cfg = get_preset("mtnlg-530b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.seq_length) == (105, 20480, 128, 2048)
    assert (cfg.position, cfg.activation, cfg.norm) == ("learned", "gelu", "layernorm")
    assert 525e9 < count_parameters(cfg) < 535e9
    assert 1.25e9 < count_parameters(get_preset("mtnlg-1.3b")) < 1.4e9
    assert 8.2e9 < count_parameters(get_preset("mtnlg-8.3b")) < 8.4e9
    get_preset("debug").num_layers = 7  # a copy: the registry is untouched
    assert PRESETS["debug"].num_layers == 2
    with pytest.raises(ConfigError, match="unknown model preset 'gpt-9'"):
        get_preset("gpt-9")


@pytest.mark.parametrize("name", ["debug", "tiny-llama", "small-20m", "mtnlg-1.3b", "mtnlg-530b"])
def test_count_parameters_matches_the_module(name):
    cfg = get_preset(name)
    for tp in (1, 8):
        with torch.device("meta"):  # no memory, even for 530B
            model = GPT(cfg, tp=tp)
        assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg, tp)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_count_parameters_matches_the_module_for_each_variant(variant):
    for extra in ({}, {"tie_embeddings": False}, {"bias": False}):
        cfg = tiny(**{**VARIANTS[variant], **extra})
        assert sum(p.numel() for p in GPT(cfg).parameters()) == count_parameters(cfg)


def test_flops_per_token_is_6n_plus_attention():
    cfg = get_preset("mtnlg-1.3b")
    L, H, T, V = 24, 2048, 2048, cfg.padded_vocab_size()
    non_embedding = count_parameters(cfg) - V * H - T * H
    assert flops_per_token(cfg) == 6 * (non_embedding + V * H) + 12 * L * H * T
    # the classic 1.3B figure: ~ 6 * 1.3e9 plus ~25% attention at T=2048
    assert 9.0e9 < flops_per_token(cfg) < 9.2e9


# ---- maths of the pieces ---------------------------------------------------------------------

def test_core_attention_matches_explicit_softmax_with_grouped_kv_heads():
    torch.manual_seed(0)
    B, T, nh, nkv, hd = 2, 5, 4, 2, 8
    q, k, v = torch.randn(B, T, nh, hd), torch.randn(B, T, nkv, hd), torch.randn(B, T, nkv, hd)
    got = CoreAttention(0.0)(q, k, v)                                      # (B, T, nh*hd)
    mask = torch.ones(T, T).tril().bool()
    heads = []
    for h in range(nh):
        kh, vh = k[:, :, h // (nh // nkv)], v[:, :, h // (nh // nkv)]       # (B, T, hd)
        scores = q[:, :, h] @ kh.transpose(1, 2) / math.sqrt(hd)            # (B, T, T)
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        heads.append(p @ vh)
    want = torch.stack(heads, dim=2).reshape(B, T, nh * hd)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    hd = 16
    rope = rope_table(32, hd, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def score(m, n):
        qs = apply_rotary(q.expand(1, 32, 1, hd), rope)[0, m, 0]
        ks = apply_rotary(k.expand(1, 32, 1, hd), rope)[0, n, 0]
        return float(qs @ ks)
    assert score(7, 3) == pytest.approx(score(20, 16), abs=1e-4)
    by_distance = torch.tensor([score(20, 20 - d) for d in range(16)])
    assert by_distance.std() > 0.1 * by_distance.abs().mean()  # yet distance matters
    assert score(0, 0) == pytest.approx(float(q @ k), abs=1e-5)  # position 0: no rotation


def test_sinusoidal_table_values():
    t = sinusoidal_table(16, 8)
    assert t[0, 0] == 0 and t[0, 1] == 1
    assert t[5, 2].item() == pytest.approx(math.sin(5 / 10000 ** (2 / 8)), abs=1e-6)
    assert t[5, 3].item() == pytest.approx(math.cos(5 / 10000 ** (2 / 8)), abs=1e-6)


# ---- the module ------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_is_causal(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant])).eval()
    tokens = torch.randint(0, 300, (2, 20))
    logits = model(tokens)
    assert logits.shape == (2, 20, 304)
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 300
    again = model(changed)
    torch.testing.assert_close(again[:, :12], logits[:, :12], atol=1e-6, rtol=0)
    assert (again[:, 12:] - logits[:, 12:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="longer than model.seq_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_positions_break_permutation_invariance():
    # without positions, attention at the last token would not see the order of the earlier
    # ones; each kind of position must make swapping two of them change the last logits
    torch.manual_seed(0)
    tokens = torch.tensor([[11, 22, 33, 44, 55, 66]])
    swapped = torch.tensor([[22, 11, 33, 44, 55, 66]])
    for kind in ("learned", "sinusoidal", "rotary"):
        model = GPT(tiny(position=kind, init_std=0.2)).eval()  # sharper attention
        assert (model(tokens)[0, -1] - model(swapped)[0, -1]).abs().max() > 1e-3, kind


def test_megatron_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    cfg = tiny(hidden_size=256, num_layers=8, init_std=0.02)
    model = GPT(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith(("wo.weight", "w_down.weight")):
            assert p.std().item() == pytest.approx(out_std, rel=0.05), name
        elif name.endswith(("wq.weight", "w_up.weight", "tok_embeddings.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias"):
            assert p.abs().max() == 0, name
        elif "norm" in name:
            assert (p == 1).all(), name


def test_parameter_names_are_stable():
    names = set(dict(GPT(tiny(num_layers=1)).named_parameters()))
    assert names == {
        "tok_embeddings.weight", "pos_embeddings.weight",
        *(f"layers.0.{m}.{w}" for m in ("attention_norm", "mlp_norm", "attention.wq", "attention.wk",
                                         "attention.wv", "attention.wo", "mlp.w_up", "mlp.w_down")
          for w in ("weight", "bias")),
        "norm.weight", "norm.bias"}  # output.weight is tok_embeddings.weight (tied)
    llama = GPT(tiny(num_layers=1, **VARIANTS["llama"]))
    sd = llama.state_dict()
    assert "layers.0.mlp.w_gate.weight" in sd and "output.weight" in sd
    assert "rope" not in sd and "layers.0.attention_norm.bias" not in sd


def test_tied_head_shares_the_embedding():
    model = GPT(tiny())
    assert model.output.weight is model.tok_embeddings.weight
    untied = GPT(tiny(tie_embeddings=False))
    assert untied.output.weight is not untied.tok_embeddings.weight


def test_meta_device_build_then_materialise():
    cfg = tiny(position="rotary")
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    torch.testing.assert_close(model.rope, rope_table(32, 16, 10000.0))
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.3, attention_dropout=0.3))
    tokens = torch.randint(0, 300, (2, 16))
    model.train()
    assert (model(tokens) - model(tokens)).abs().max() > 1e-4
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), atol=0, rtol=0)


def test_loss_falls_when_fitting_one_batch():
    torch.manual_seed(0)
    for variant in ("learned", "llama"):
        model = GPT(tiny(**VARIANTS[variant]))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 300, (4, 33))
        losses = []
        for _ in range(15):
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(math.log(304), rel=0.05)  # uniform start
        assert losses[-1] < 0.5 * losses[0], (variant, losses[::5])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_equals_the_full_forward(variant):
    from mtnlg.model.gpt import KVCache

    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant])).eval()
    tokens = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.for_model(model, batch_size=2)
        parts = [model(tokens[:, :10], cache=cache)]                   # prefill
        parts += [model(tokens[:, t:t + 1], cache=cache) for t in range(10, 20)]
        parts.append(model(tokens[:, 20:], cache=cache))               # a chunk after a prefix
        assert cache.length == 32
        torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="sequence of 33 tokens is longer"):
            model(tokens[:, :1], cache=cache)
        cache.reset()
        torch.testing.assert_close(model(tokens[:, :5], cache=cache), full[:, :5], atol=1e-5,
                                   rtol=1e-4)
