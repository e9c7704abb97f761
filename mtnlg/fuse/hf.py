"""Hugging Face export: explicit key maps from our GPT to ``GPT2LMHeadModel`` / ``LlamaForCausalLM``.

Two architectures cover our model's combinations exactly:

=========================================  ==========  =========================================
our config                                  HF model    notes
=========================================  ==========  =========================================
learned positions + LayerNorm + GeLU        GPT-2       q/k/v concatenated into ``c_attn``; GPT-2's
                                                        ``Conv1D`` stores weights as (in, out), so
                                                        every linear weight is transposed; biases
                                                        and LayerNorm shifts are zeros when
                                                        ``bias=False``; exact-erf ``gelu``
rotary + RMSNorm + SwiGLU                   Llama       same rotary layout (rotate halves), so q/k
                                                        need no permutation; grouped-query heads
                                                        map to ``num_key_value_heads``
=========================================  ==========  =========================================

Anything else (sinusoidal positions, rotary with LayerNorm, GeLU with RMSNorm, GPT-2 with
grouped-query heads, ...) has no architecture in ``transformers`` that computes the same
function, and is refused with a message saying so.

Every target tensor is produced by an explicit rule naming its sources. Before anything is
written, the rules are checked against an instance of the HF model built on the meta
device from the exported config: every key it has must be produced, with its exact shape,
and no rule may produce a key it lacks. Tensors are then converted and written one at a
time (streaming, as fuse does).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from mtnlg import storage
from mtnlg.formats.rundir import MANIFEST, TOKENIZER_META, TOKENIZER_MODEL
from mtnlg.model.config import ModelConfig
from mtnlg.progress import Progress, get_logger

log = get_logger("mtnlg.fuse.hf")

Getter = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """HF tensor ``target`` (of ``shape``) computed by ``make`` from our tensors ``sources``."""

    target: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    make: Callable[[list[torch.Tensor]], torch.Tensor]


def _copy(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0]


def _transpose(xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].t().contiguous()                                            # (out, in) -> (in, out)


def _cat_rows_transpose(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs, dim=0).t().contiguous()                             # 3 x (H, H) -> (H, 3H)


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs, dim=0)


def _zeros(n: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    return lambda xs: torch.zeros(n)


def hf_architecture(cfg: ModelConfig) -> str:
    """``"gpt2"`` or ``"llama"``; a ValueError explaining why for anything else."""
    combo = (cfg.position, cfg.norm, cfg.activation)
    if combo == ("learned", "layernorm", "gelu"):
        if cfg.kv_heads != cfg.num_heads:
            raise ValueError(
                f"Hugging Face GPT-2 has no grouped-query attention: model.num_kv_heads="
                f"{cfg.num_kv_heads} differs from model.num_heads={cfg.num_heads}")
        return "gpt2"
    if combo == ("rotary", "rmsnorm", "swiglu"):
        return "llama"
    raise ValueError(
        f"no Hugging Face architecture computes this model: position={cfg.position!r}, "
        f"norm={cfg.norm!r}, activation={cfg.activation!r}. Export supports learned + layernorm + "
        "gelu (GPT-2) and rotary + rmsnorm + swiglu (Llama); the fused safetensors model "
        "(load_fused) works for every combination")


def gpt2_rules(cfg: ModelConfig, vocab_rows: int) -> tuple[dict, list[Rule]]:
    H, F, T = cfg.hidden_size, cfg.ffn_size, cfg.seq_length
    config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab_rows, n_positions=T,
                  n_embd=H, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=F,
                  activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
                  tie_word_embeddings=cfg.tie_embeddings, scale_attn_weights=True)

    def bias(target: str, src: str, n: int) -> Rule:
        return Rule(target, (n,), (src,), _copy) if cfg.bias else Rule(target, (n,), (), _zeros(n))

    rules = [Rule("transformer.wte.weight", (vocab_rows, H), ("tok_embeddings.weight",), _copy),
             Rule("transformer.wpe.weight", (T, H), ("pos_embeddings.weight",), _copy)]
    for i in range(cfg.num_layers):
        o, h = f"layers.{i}", f"transformer.h.{i}"
        qkv = tuple(f"{o}.attention.{w}" for w in ("wq", "wk", "wv"))
        rules += [
            Rule(f"{h}.ln_1.weight", (H,), (f"{o}.attention_norm.weight",), _copy),
            bias(f"{h}.ln_1.bias", f"{o}.attention_norm.bias", H),
            Rule(f"{h}.attn.c_attn.weight", (H, 3 * H), tuple(f"{q}.weight" for q in qkv), _cat_rows_transpose),
            (Rule(f"{h}.attn.c_attn.bias", (3 * H,), tuple(f"{q}.bias" for q in qkv), _cat) if cfg.bias
             else Rule(f"{h}.attn.c_attn.bias", (3 * H,), (), _zeros(3 * H))),
            Rule(f"{h}.attn.c_proj.weight", (H, H), (f"{o}.attention.wo.weight",), _transpose),
            bias(f"{h}.attn.c_proj.bias", f"{o}.attention.wo.bias", H),
            Rule(f"{h}.ln_2.weight", (H,), (f"{o}.mlp_norm.weight",), _copy),
            bias(f"{h}.ln_2.bias", f"{o}.mlp_norm.bias", H),
            Rule(f"{h}.mlp.c_fc.weight", (H, F), (f"{o}.mlp.w_up.weight",), _transpose),
            bias(f"{h}.mlp.c_fc.bias", f"{o}.mlp.w_up.bias", F),
            Rule(f"{h}.mlp.c_proj.weight", (F, H), (f"{o}.mlp.w_down.weight",), _transpose),
            bias(f"{h}.mlp.c_proj.bias", f"{o}.mlp.w_down.bias", H),
        ]
    rules += [Rule("transformer.ln_f.weight", (H,), ("norm.weight",), _copy), bias("transformer.ln_f.bias", "norm.bias", H)]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", (vocab_rows, H), ("output.weight",), _copy))
    return config, rules


def llama_rules(cfg: ModelConfig, vocab_rows: int) -> tuple[dict, list[Rule]]:
    H, F, hd = cfg.hidden_size, cfg.ffn_size, cfg.head_dim
    nq, nkv = cfg.num_heads * hd, cfg.kv_heads * hd
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_rows, hidden_size=H,
                  intermediate_size=F, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.kv_heads, head_dim=hd, hidden_act="silu",
                  max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.norm_eps,
                  initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=0.0)
    rules = [Rule("model.embed_tokens.weight", (vocab_rows, H), ("tok_embeddings.weight",), _copy)]

    def linear(target: str, src: str, out: int, inp: int) -> list[Rule]:
        r = [Rule(f"{target}.weight", (out, inp), (f"{src}.weight",), _copy)]
        if cfg.bias:
            r.append(Rule(f"{target}.bias", (out,), (f"{src}.bias",), _copy))
        return r

    for i in range(cfg.num_layers):
        o, h = f"layers.{i}", f"model.layers.{i}"
        rules.append(Rule(f"{h}.input_layernorm.weight", (H,), (f"{o}.attention_norm.weight",), _copy))
        rules += linear(f"{h}.self_attn.q_proj", f"{o}.attention.wq", nq, H)
        rules += linear(f"{h}.self_attn.k_proj", f"{o}.attention.wk", nkv, H)
        rules += linear(f"{h}.self_attn.v_proj", f"{o}.attention.wv", nkv, H)
        rules += linear(f"{h}.self_attn.o_proj", f"{o}.attention.wo", H, nq)
        rules.append(Rule(f"{h}.post_attention_layernorm.weight", (H,), (f"{o}.mlp_norm.weight",), _copy))
        rules += linear(f"{h}.mlp.gate_proj", f"{o}.mlp.w_gate", F, H)
        rules += linear(f"{h}.mlp.up_proj", f"{o}.mlp.w_up", F, H)
        rules += linear(f"{h}.mlp.down_proj", f"{o}.mlp.w_down", H, F)
    rules.append(Rule("model.norm.weight", (H,), ("norm.weight",), _copy))
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", (vocab_rows, H), ("output.weight",), _copy))
    return config, rules


def export_rules(cfg: ModelConfig, vocab_rows: int) -> tuple[dict, list[Rule]]:
    """The HF config dict and the tensor rules for ``cfg``."""
    return gpt2_rules(cfg, vocab_rows) if hf_architecture(cfg) == "gpt2" else llama_rules(cfg, vocab_rows)


def hf_config(config: dict):
    from transformers import AutoConfig

    kw = dict(config)
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def check_rules(config: dict, rules: list[Rule], our_shapes: dict[str, tuple[int, ...]]) -> None:
    """Every key of the HF model is produced with its shape, nothing else is, and every
    source tensor exists in our model with the shape the rule expects."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(hf_config(config))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if config.get("tie_word_embeddings"):
        expected.pop("lm_head.weight", None)  # stored once, as the embedding
    produced = {r.target: r.shape for r in rules}
    missing = sorted(set(expected) - set(produced))
    if missing:
        raise ValueError(f"HF export: no rule produces {missing[0]!r} ({len(missing)} keys missing)")
    unknown = sorted(set(produced) - set(expected))
    if unknown:
        raise ValueError(f"HF export: rule target {unknown[0]!r} is not a key of {config['architectures'][0]}")
    for k, shape in produced.items():
        if expected[k] != shape:
            raise ValueError(f"HF export: {k!r} has shape {expected[k]} in {config['architectures'][0]}, "
                             f"the rule produces {shape}")
    used = {s for r in rules for s in r.sources}
    for s in sorted(used):
        if s not in our_shapes:
            raise ValueError(f"HF export: source tensor {s!r} is not in the fused model")
    unused = sorted(set(our_shapes) - used)
    if unused:
        raise ValueError(f"HF export: fused tensor {unused[0]!r} is not used by any rule ({len(unused)} unused)")


def convert(rules: list[Rule], get: Getter) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf name, tensor)`` one at a time, checking each produced shape."""
    for r in rules:
        t = r.make([get(s) for s in r.sources])
        if tuple(t.shape) != r.shape:
            raise ValueError(f"HF export: {r.target!r} came out with shape {tuple(t.shape)}, expected {r.shape}")
        yield r.target, t


@torch.no_grad()
def compare_logits(hf_dir: str, model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Max |logit difference| between our model and the HF model loaded offline from ``hf_dir``."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32)
    hf.eval()
    ours = model.float()(tokens).float()                                         # (B, T, V_padded)
    theirs = hf(tokens).logits.float()                                           # (B, T, V_padded)
    return float((ours - theirs).abs().max())


def export_hf(fused_dir: str, output: str, max_shard_bytes: int = 2 << 30, verify: bool = True,
              atol: float = 1e-4) -> dict:
    """Write a Hugging Face model directory for the fused model in ``fused_dir``.

    The weights keep the fused dtype. With ``verify`` the exported directory is loaded with
    ``AutoModelForCausalLM.from_pretrained`` (offline) and its logits on a fixed batch must
    match our model's within ``atol`` (in fp32; the two differ only in kernel order).
    Returns a summary (architecture, files, max logit difference).
    """
    from safetensors import safe_open

    from mtnlg.formats.fused import load_fused, read_model_config, weight_files
    from mtnlg.formats.manifest import hash_files, read_manifest, verify_files, write_manifest
    from mtnlg.formats.sharded_safetensors import ShardedSafetensorsWriter, TensorSpec

    with storage.local_copy(fused_dir) as src, storage.local_dir_for_output(output) as out:
        manifest = read_manifest(src)
        verify_files(src, manifest)
        cfg = read_model_config(src)
        files = weight_files(src)
        handles = {f: safe_open(os.path.join(src, f), framework="pt") for f in set(files.values())}
        shapes = {k: tuple(handles[f].get_slice(k).get_shape()) for k, f in files.items()}
        vocab_rows = shapes["tok_embeddings.weight"][0]
        config, rules = export_rules(cfg, vocab_rows)
        config["eos_token_id"] = config["bos_token_id"] = _eod_id(src)
        check_rules(config, rules, shapes)
        dtype = handles[files["tok_embeddings.weight"]].get_tensor("tok_embeddings.weight").dtype
        config["dtype"] = str(dtype).replace("torch.", "")

        def get(name: str) -> torch.Tensor:
            return handles[files[name]].get_tensor(name)

        specs = [TensorSpec(r.target, r.shape, dtype) for r in rules]
        prog = Progress("hf export", total=len(rules), unit="tensors")
        with ShardedSafetensorsWriter(out, specs, max_shard_bytes) as w:
            for name, t in convert(rules, get):
                w.write(name, t)
                prog.update(1)
        prog.close()
        hf_config(config).save_pretrained(out)
        # The SentencePiece model travels with the weights; an exact HF tokenizer is
        # written beside it when the conversion reproduces SentencePiece's ids.
        for name in (TOKENIZER_MODEL, TOKENIZER_META):
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(out, "mtnlg_" + name))
        hf_tokenizer = _export_tokenizer(src, out)
        side = [n for n in sorted(os.listdir(out)) if n not in w.files and n != MANIFEST]
        all_files = {**w.files, **hash_files(out, side)}
        result = {"architecture": config["architectures"][0], "tensors": len(rules),
                  "weight_bytes": sum(s.nbytes for s in specs), "tokenizer": hf_tokenizer}
        if verify:
            model, _, _ = load_fused(src, verify=False)
            g = torch.Generator().manual_seed(0)
            T = min(cfg.seq_length, 32)
            tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
            diff = compare_logits(out, model, tokens)
            result["max_abs_logit_diff"] = diff
            if not diff <= atol:
                raise ValueError(f"HF export of {fused_dir}: logits differ from ours by {diff:.3g} "
                                 f"(tolerance {atol:g})")
            log.info("HF export verified: %s logits within %.2g of ours (tolerance %g)", result["architecture"],
                     diff, atol)
        write_manifest(out, all_files, w.tensors, kind="huggingface", architecture=result["architecture"],
                       source=str(fused_dir), verification=result.get("max_abs_logit_diff"))
    return result


def _export_tokenizer(src: str, out: str) -> str:
    """HF tokenizer files in ``out`` when possible; returns what was written, or why not."""
    from mtnlg.formats.tokenizer import Tokenizer
    from mtnlg.fuse.hf_tokenizer import write_hf_tokenizer

    model = os.path.join(src, TOKENIZER_MODEL)
    if not os.path.exists(model):
        return "none (no tokenizer.model in the fused directory)"
    try:
        write_hf_tokenizer(Tokenizer(model, eod_id=_eod_id(src)), out)
    except ValueError as e:
        log.warning("HF export: no Hugging Face tokenizer files written: %s; use mtnlg_tokenizer.model "
                    "with sentencepiece", e)
        return f"sentencepiece only ({e})"
    return TOKENIZER_META


def _eod_id(directory: str) -> int | None:
    path = os.path.join(directory, TOKENIZER_META)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("eod_id")
    return None
