"""Fuse, reshard and Hugging Face export against a real TP=2 training run.

One run per module: ``mtnlg train --nproc 2 --recipe debug parallel.tp=2`` for 3 steps
(checkpoints at steps 2 and 3) on a small SentencePiece tokenization of the bundled
"What's new" documents. Tolerances: the fused model against the single-process DCP load
is bit-identical in fp32 (checked to 1e-6); against the TP=2 model itself, whose matmuls
reduce in another order, within 1e-5; the HF models within 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from corpus_data import tokenized_dir, whatsnew_paragraphs
from distributed import run_distributed

from mtnlg.cli import main as mtnlg_main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> str:
    docs = whatsnew_paragraphs(max_files=6)
    cut = len(docs) * 9 // 10
    return tokenized_dir(tmp_path_factory.mktemp("fusedata"), docs[:cut], docs[cut:])


@pytest.fixture(scope="module")
def run_dir(tokenized, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("fuserun") / "run")
    assert mtnlg_main(["train", "--nproc", "2", "--recipe", "debug", f"data.path={tokenized}", f"output={out}",
                       "parallel.tp=2", "train.steps=3", "train.log_every=1", "train.eval_iters=0",
                       "checkpoint.every=2", "checkpoint.keep_last=0"]) == 0
    return out


@pytest.fixture(scope="module")
def fused(run_dir, tmp_path_factory) -> str:
    """``mtnlg fuse RUN --output DIR --hf`` with small shards, so the index path runs too."""
    out = str(tmp_path_factory.mktemp("fused") / "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert mtnlg_main(["fuse", run_dir, "--output", out, "--hf", "--max-shard-size", "200KB"]) == 0
    return out


def _tp_logits(rank: int, world: int, ckpt: str, tokens: list) -> list:
    """Logits of the TP=2 model with the checkpoint loaded (runs in 2 processes)."""
    from mtnlg.config import from_dict
    from mtnlg.formats.checkpoint import load_checkpoint
    from mtnlg.model.config import ModelConfig
    from mtnlg.model.gpt import GPT
    from mtnlg.parallel.config import ParallelConfig
    from mtnlg.parallel.dims import ParallelDims
    from mtnlg.parallel.parallelize import parallelize_gpt

    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        cfg = from_dict(ModelConfig, json.load(f)["model"])
    pc = ParallelConfig(tp=2)
    dims = ParallelDims.build(pc, world, cfg)
    model = parallelize_gpt(GPT(cfg, tp=2), dims.build_mesh("cpu"), dims)
    load_checkpoint(ckpt, model, None)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(tokens))
    return logits.full_tensor().tolist()


def _latest(run_dir: str) -> str:
    from mtnlg.formats.checkpoint import resolve_checkpoint

    return resolve_checkpoint(run_dir)


def test_fused_model_equals_the_tp2_model(fused, run_dir):
    from mtnlg.formats.fused import load_fused
    from mtnlg.fuse.fuse import fixed_batch, reference_logits

    model, cfg, tok = load_fused(fused, decode_layout=False)  # row-major, as trained: bitwise
    assert tok.vocab_size == cfg.vocab_size == 512
    manifest = json.load(open(os.path.join(fused, "manifest.json")))
    assert manifest["step"] == 3 and manifest["verification"]["max_abs_logit_diff"] <= 1e-6
    shards = sorted(f for f in os.listdir(fused) if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.exists(os.path.join(fused, "model.safetensors.index.json"))
    assert set(manifest["files"]) >= {*shards, "config.json", "tokenizer.model", "tokenizer.json"}
    tokens = fixed_batch(cfg)
    with torch.no_grad():
        got = model(tokens)
    ckpt = _latest(run_dir)
    assert torch.equal(got, reference_logits(ckpt, cfg, tokens))  # fp32: bit-identical weights
    tp = torch.tensor(run_distributed(_tp_logits, 2, (ckpt, tokens.tolist()))[0])
    assert tp.shape == got.shape
    assert torch.allclose(got, tp, atol=1e-5, rtol=0), float((got - tp).abs().max())


def test_hf_gpt2_export_loads_offline_and_matches(fused, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mtnlg.formats.fused import load_fused
    from mtnlg.fuse.fuse import fixed_batch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(fused, "hf"))
    assert type(hf).__name__ == "GPT2LMHeadModel"
    model, cfg, _ = load_fused(fused)
    tokens = fixed_batch(cfg)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), float((ours - theirs).abs().max())


def test_hf_llama_export_matches(tmp_path, fused, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mtnlg.formats.tokenizer import Tokenizer
    from mtnlg.formats.fused import save_fused
    from mtnlg.fuse.hf import export_hf
    from mtnlg.model.config import ModelConfig
    from mtnlg.model.gpt import GPT

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, seq_length=64, vocab_size=512,
                      position="rotary", norm="rmsnorm", activation="swiglu", tie_embeddings=False, bias=False)
    model = GPT(cfg).eval()
    save_fused(model, str(tmp_path / "m"), Tokenizer.from_dir(fused))
    result = export_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
    assert result["architecture"] == "LlamaForCausalLM" and result["max_abs_logit_diff"] <= 1e-4
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    tokens = torch.randint(0, 512, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_hf_export_refuses_other_architectures():
    from mtnlg.fuse.hf import hf_architecture
    from mtnlg.model.config import ModelConfig

    for kw in (dict(position="sinusoidal"), dict(position="rotary"), dict(norm="rmsnorm"),
               dict(position="rotary", norm="rmsnorm", activation="gelu")):
        with pytest.raises(ValueError, match="no Hugging Face architecture"):
            hf_architecture(ModelConfig(**kw))
    with pytest.raises(ValueError, match="grouped-query"):
        hf_architecture(ModelConfig(num_kv_heads=2))


def test_bf16_fuse_is_half_the_size_within_tolerance(run_dir, fused, tmp_path):
    from mtnlg.fuse.fuse import fuse_checkpoint

    r = fuse_checkpoint(run_dir, str(tmp_path / "bf16"), dtype="bf16")
    fp32_bytes = json.load(open(os.path.join(fused, "manifest.json")))["weight_bytes"]
    assert r["bytes"] * 2 == fp32_bytes and 0 < r["max_abs_logit_diff"] < 0.1


def _entries_equal(a_path: str, b_path: str) -> int:
    """Number of checkpoint entries compared; asserts each is identical."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from mtnlg.formats.dcp_reader import CheckpointReader

    with CheckpointReader(a_path) as a, CheckpointReader(b_path) as b:
        ea, eb = a.entries(), b.entries()
        assert set(ea) == set(eb)
        for k, md in ea.items():
            if isinstance(md, TensorStorageMetadata):
                x, y = a.read(k), b.read(k)
                assert x.dtype == y.dtype and torch.equal(x, y), k
            else:
                assert a.read_bytes_entry(k) == b.read_bytes_entry(k), k
    return len(ea)


def test_reshard_round_trip_is_bitwise_and_training_resumes(run_dir, tokenized, tmp_path):
    src = os.path.join(run_dir, "checkpoints", "step_00000002")
    assert mtnlg_main(["reshard", src, "--tp", "1", "--output", str(tmp_path / "tp1")]) == 0
    assert mtnlg_main(["reshard", str(tmp_path / "tp1"), "--tp", "2", "--output", str(tmp_path / "tp2")]) == 0
    tp1 = os.path.join(tmp_path, "tp1", "step_00000002")
    back = os.path.join(tmp_path, "tp2", "step_00000002")
    assert _entries_equal(src, back) > 100  # model + Adam moments + hyper-parameters
    with open(os.path.join(tp1, "config.yaml")) as f:
        assert "tp: 1" in f.read()
    # resume the TP=1 checkpoint on one process: step 3 must match the TP=2 run's step 3
    out = str(tmp_path / "resumed")
    assert mtnlg_main(["train", "--nproc", "1", "--recipe", "debug", f"data.path={tokenized}", f"output={out}",
                       "parallel.tp=1", "train.steps=3", "train.log_every=1", "train.eval_iters=0",
                       f"checkpoint.load={tmp_path / 'tp1'}"]) == 0
    log = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")) if x.strip()]
    ref = [json.loads(x) for x in open(os.path.join(run_dir, "log.jsonl")) if x.strip()]
    assert [r["step"] for r in log] == [3]
    assert log[0]["loss"] == pytest.approx(ref[-1]["loss"], abs=1e-4)
    assert log[0]["consumed_samples"] == ref[-1]["consumed_samples"]


def test_reshard_across_pipeline_degrees_round_trips_and_resumes(run_dir, tokenized, tmp_path):
    # tp=2 pp=1 (tied embeddings, grouped optimizer state) -> tp=1 pp=2 (per-parameter
    # hyper-parameters, the last stage's copy of the table) -> back, bit for bit
    src = os.path.join(run_dir, "checkpoints", "step_00000002")
    assert mtnlg_main(["reshard", src, "--tp", "1", "--pp", "2", "--output", str(tmp_path / "pp2")]) == 0
    assert mtnlg_main(["reshard", str(tmp_path / "pp2"), "--tp", "2", "--output", str(tmp_path / "back")]) == 0
    assert _entries_equal(src, os.path.join(tmp_path, "back", "step_00000002")) > 100
    from mtnlg.formats.dcp_reader import CheckpointReader

    with CheckpointReader(os.path.join(tmp_path, "pp2", "step_00000002")) as r:
        e = r.entries()
        assert "optim.param_groups.0.params" not in e and "optim.param_groups.layers.1.mlp.w_up.weight.lr" in e
        for moment in ("exp_avg", "exp_avg_sq"):  # the last stage's copy starts from the shared one's
            assert torch.equal(r.read(f"optim.state.output.weight.{moment}"),
                               r.read(f"optim.state.tok_embeddings.weight.{moment}"))
    # the pp=2 checkpoint resumes on 2 pipeline stages: step 3 as the tp=2 run's
    out = str(tmp_path / "resumed")
    assert mtnlg_main(["train", "--nproc", "2", "--recipe", "debug", f"data.path={tokenized}", f"output={out}",
                       "parallel.tp=1", "parallel.pp=2", "train.steps=3", "train.log_every=1", "train.eval_iters=0",
                       f"checkpoint.load={tmp_path / 'pp2'}"]) == 0
    log = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")) if x.strip()]
    ref = [json.loads(x) for x in open(os.path.join(run_dir, "log.jsonl")) if x.strip()]
    assert [r["step"] for r in log] == [3]
    assert log[0]["loss"] == pytest.approx(ref[-1]["loss"], abs=1e-4)
    assert log[0]["grad_norm"] == pytest.approx(ref[-1]["grad_norm"], rel=1e-4)


def test_reshard_refuses_impossible_layouts(run_dir, tmp_path):
    assert mtnlg_main(["reshard", run_dir, "--tp", "3", "--output", str(tmp_path / "x")]) == 2  # 4 heads
    assert mtnlg_main(["reshard", run_dir, "--tp", "1", "--pp", "3", "--output", str(tmp_path / "y")]) == 2  # 2 layers
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_reshard_keeps_vocab_rows_when_possible():
    from mtnlg.fuse.reshard import new_vocab_padding

    assert new_vocab_padding(300, 512, 1, [128]) == (512, 512)   # 300 -> 512 rows kept at tp=1
    assert new_vocab_padding(300, 512, 2, [128, 512]) == (128, 512)  # the original padding comes back
    assert new_vocab_padding(300, 512, 3, [128]) == (171, 513)   # 3 does not divide 512: one zero row


def test_damaged_fused_files_name_file_and_tensor(fused, tmp_path):
    from mtnlg.formats.fused import load_fused
    from mtnlg.formats.sharded_safetensors import read_header

    d = tmp_path / "m"
    shutil.copytree(fused, d, ignore=shutil.ignore_patterns("hf"))
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
    header, start = read_header(str(d / shard))
    name, entry = next((k, v) for k, v in header.items() if k != "__metadata__")
    with open(d / shard, "r+b") as f:  # flip one byte inside the first tensor's data
        f.seek(start + entry["data_offsets"][0] + 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=rf"{shard}.*checksum.*{name.replace('.', '[.]')}"):
        load_fused(str(d))
    os.remove(d / shard)
    with pytest.raises(FileNotFoundError, match=rf"{shard} is missing.*{name.replace('.', '[.]')}"):
        load_fused(str(d))
    # a config that does not fit the weights: the shape error names file and tensor
    shutil.rmtree(d)
    shutil.copytree(fused, d, ignore=shutil.ignore_patterns("hf"))
    cfg = json.load(open(d / "config.json"))
    cfg["seq_length"] = 32
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(ValueError, match=r"config\.json: (size \d+ bytes, manifest says|sha256 checksum mismatch)"):
        load_fused(str(d))
    with pytest.raises(ValueError, match=r"safetensors: tensor 'pos_embeddings\.weight' has shape \(64, 64\)"):
        load_fused(str(d), verify=False)


def test_damaged_checkpoint_names_file_and_tensor(run_dir, tmp_path):
    from mtnlg.fuse.fuse import fuse_checkpoint

    ck = tmp_path / "ck"
    shutil.copytree(_latest(run_dir), ck)
    with open(ck / "__1_0.distcp", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"__1_0\.distcp is truncated.*tensor 'model\."):
        fuse_checkpoint(str(ck), str(tmp_path / "o1"))
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o1.partial")
    os.remove(ck / "__1_0.distcp")
    with pytest.raises(FileNotFoundError, match=r"__1_0\.distcp is missing: shard file holding tensor 'model\."):
        fuse_checkpoint(str(ck), str(tmp_path / "o2"))


def test_fuse_from_and_to_gcs(run_dir, gcs):
    from mtnlg import storage
    from mtnlg.formats.fused import load_fused
    from mtnlg.fuse.fuse import fuse_checkpoint

    storage.copy_tree(os.path.join(run_dir, "checkpoints", "step_00000003"), f"{gcs}/run/checkpoints/step_00000003")
    storage.write_text(f"{gcs}/run/checkpoints/latest", "step_00000003\n")
    r = fuse_checkpoint(f"{gcs}/run", f"{gcs}/model")
    assert r["max_abs_logit_diff"] <= 1e-6 and storage.exists(f"{gcs}/model/manifest.json")
    model, cfg, tok = load_fused(f"{gcs}/model")  # as generate and serve load it
    assert cfg.vocab_size == tok.vocab_size
    # against the checkpoint on local disk, read here tensor by tensor: every weight equal ...
    from mtnlg.formats.dcp_reader import CheckpointReader
    from mtnlg.model.gpt import GPT

    with CheckpointReader(os.path.join(run_dir, "checkpoints", "step_00000003")) as reader:
        stored = {name: reader.read(spec.name) for name, spec in reader.model_tensors().items()}
    fused = dict(model.named_parameters())
    assert set(fused) == set(stored) - {"output.weight"} and len(fused) > 10  # tied output: stored once
    for name, w in fused.items():
        assert torch.equal(w, stored[name]), name
    # ... and the same logits as a model built from those tensors
    reference = GPT(cfg).eval()
    reference.load_state_dict({n: stored.get(n, stored["tok_embeddings.weight"])
                               for n in reference.state_dict()}, strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(tokens), reference(tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), float((got - want).abs().max())


def test_untrusted_checkpoint_metadata_is_refused(run_dir, tmp_path):
    import pickle

    from mtnlg.formats.dcp_reader import CheckpointReader

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ck = tmp_path / "ck"
    shutil.copytree(_latest(run_dir), ck)
    (ck / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match=r"\.metadata: refusing to load.*system"):
        CheckpointReader(str(ck))


def test_hf_export_carries_an_exact_tokenizer(fused, monkeypatch):
    """AutoTokenizer on the export encodes like our SentencePiece model, and decodes back."""
    from transformers import AutoTokenizer

    from mtnlg.formats.tokenizer import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_tok = AutoTokenizer.from_pretrained(os.path.join(fused, "hf"))
    ours = Tokenizer(os.path.join(fused, "tokenizer.model"))
    texts = whatsnew_paragraphs(max_files=1)[:200] + ["  two  spaces\n\tand a tab", "café 東京 🙂"]
    for text in texts:
        ids = ours.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == ours.eod_id
    # the chat format travels with it: apply_chat_template gives what mtnlg serve runs
    from mtnlg.generate.chat import format_chat
    from mtnlg.model.decode import prompt_ids_for

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is  a list?"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)  # a BatchEncoding in transformers 5
    assert ids == prompt_ids_for(ours, format_chat(messages))
    assert format_chat(messages).endswith("User: What is a list?\nAssistant:")


def test_names_in_a_fused_models_manifest_and_index_cannot_leave_it(fused, tmp_path):
    from mtnlg.formats.fused import load_fused, weight_files
    from mtnlg.formats.manifest import safe_relative

    d = tmp_path / "m"
    shutil.copytree(fused, d, ignore=shutil.ignore_patterns("hf"))
    manifest = json.load(open(d / "manifest.json"))
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "bytes": 1}
    json.dump(manifest, open(d / "manifest.json", "w"))
    with pytest.raises(ValueError, match=r"'\.\./outside\.txt' would leave the model directory"):
        load_fused(str(d))
    index = next(iter(d.glob("*.index.json")), None)
    if index is not None:
        data = json.load(open(index))
        first = next(iter(data["weight_map"]))
        data["weight_map"][first] = "/etc/passwd"
        json.dump(data, open(index, "w"))
        with pytest.raises(ValueError, match="would leave the model directory"):
            weight_files(str(d))
    for bad in ("", "/abs", "a/../../b", "./x", 3):
        with pytest.raises(ValueError):
            safe_relative(bad, "m")
    assert safe_relative("model-00001-of-00002.safetensors", "m") == "model-00001-of-00002.safetensors"


def test_a_resharded_checkpoint_carries_checksums_and_its_writer_count(run_dir, tmp_path, caplog):
    """Like any checkpoint: `mtnlg verify` checks every shard's sha256 (no "has no checksums"
    warning), the state names the one process that wrote it, and damage is caught."""
    import logging

    from mtnlg.formats.checkpoint import verify_checkpoint

    assert mtnlg_main(["reshard", run_dir, "--tp", "1", "--output", str(tmp_path / "tp1")]) == 0
    ck = tmp_path / "tp1" / "step_00000003"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["rng"] == "dropped by mtnlg reshard"
    sums = json.loads((ck / "checksums" / "rank_00000.json").read_text())
    assert ".metadata" in sums and any(n.endswith(".distcp") for n in sums)
    side = json.loads((ck / "checksums" / "rank_00000-side.json").read_text())
    assert "config.yaml" in side and "tokenizer.model" in side
    with caplog.at_level(logging.WARNING):
        assert verify_checkpoint(str(ck)) == []
    assert "checksums" not in caplog.text
    shard = next(p for p in ck.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(str(ck)) == [f"{shard.name}: sha256 mismatch (the file's content changed after it "
                                          "was written)"]


def test_the_fuse_command_line_is_the_fuse_config(tmp_path):
    """`mtnlg fuse` builds the same FuseConfig the pipeline's fuse step reads: same defaults
    (a Hugging Face export, 2 GiB shards), its flags shortcuts for its keys, a YAML file and
    KEY=VALUE overrides on top."""
    import argparse

    from mtnlg.fuse.cli import add_arguments, fuse_config
    from mtnlg.fuse.config import FuseConfig

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert fuse_config(p.parse_args(["run", "-o", "m"])) == FuseConfig()
    assert FuseConfig().hf is True and FuseConfig().max_shard_bytes == 2 << 30
    got = fuse_config(p.parse_args(["run", "-o", "m", "--no-hf", "--dtype", "bf16", "--max-shard-size", "2GiB",
                                    "--no-verify"]))
    assert got == FuseConfig(dtype="bf16", hf=False, max_shard_bytes=2 << 30, verify=False)
    (tmp_path / "fuse.yaml").write_text("dtype: fp16\nmax_shard_bytes: 1000\n")
    got = fuse_config(p.parse_args(["run", "hf=false", "-o", "m", "--config", str(tmp_path / "fuse.yaml")]))
    assert got == FuseConfig(dtype="fp16", hf=False, max_shard_bytes=1000)
    from mtnlg.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'hff'"):
        fuse_config(p.parse_args(["run", "hff=false", "-o", "m"]))
