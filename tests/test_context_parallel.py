"""Context parallelism (``mtnlg.parallel.cp``): the load-balanced sharding of a sequence,
the model's ``position_ids``, and the all-gather attention on 4 CPU processes (gloo)
against the single-process model, with pipeline parallelism (pp=2 x cp=2, every
schedule, 3 AdamW steps), and ``mtnlg train`` with ``parallel.cp=2``.

Tolerance (fp32), per element of the logits (gathered back into sequence order), of the
mean loss over the whole batch, of every parameter's gradient, and (pipelines) of the
gradient norm and the evaluation loss:
``|cp - single| <= 1e-6 + 1e-5 * |single|``; each check reports its worst element as a
fraction of that bound.
"""

from __future__ import annotations

import json

import pytest
import torch

from mtnlg.config import ConfigError, load_config
from mtnlg.model.config import ModelConfig
from mtnlg.model.gpt import GPT, KVCache
from mtnlg.parallel.cp import chunk_positions, shard_sequence, unshard_sequence
from mtnlg.train.config import TrainRunConfig, recipe


# ------------------------------------------------------------------ no processes


@pytest.mark.unit
def test_rank_r_holds_chunks_r_and_2cp_minus_1_minus_r():
    assert chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert chunk_positions(12, 3, 1).tolist() == [2, 3, 8, 9]
    assert chunk_positions(8, 1, 0).tolist() == list(range(8))
    with pytest.raises(ValueError, match="sequence length 10 is not divisible by 2 \\* cp = 4"):
        chunk_positions(10, 2, 0)


@pytest.mark.unit
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_sharding_covers_the_sequence_once_and_balances_causal_work(cp):
    T = 24 * cp
    held = [chunk_positions(T, cp, r) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(T))
    # causal work of a rank: the (query, key) pairs it computes, sum over its queries of p + 1
    work = {int((pos + 1).sum()) for pos in held}
    assert len(work) == 1, work
    x = torch.arange(2 * T).view(2, T)
    parts = [shard_sequence(x, cp, r) for r in range(cp)]
    assert all(p.shape == (2, T // cp) for p in parts)
    assert torch.equal(unshard_sequence(parts), x)


@pytest.mark.unit
@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rotary"])
def test_position_ids_give_the_model_the_global_positions(position):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_length=16, vocab_size=64,
                      position=position, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x, position_ids=torch.arange(16)), model(x))
        # four tokens at positions 0, 1, 6, 7 (as rank 0 of cp=2 holds them) are not the
        # same tokens at 0 .. 3: absolute tables differ, and so do rotary's relative angles
        four = x[:, :4]
        apart = model(four, position_ids=torch.tensor([0, 1, 6, 7]))
        assert (apart - model(four)).abs().max() > 1e-5  # float noise here is about 1e-7
    with pytest.raises(ValueError, match="position_ids cannot be combined with a KVCache"):
        model(x[:, :4], cache=KVCache.for_model(model, 2), position_ids=torch.arange(4))


def _run_config(*overrides: str) -> TrainRunConfig:
    return load_config(TrainRunConfig, None, ["data.path=/nonexistent/tok", "output=/nonexistent/run",
                                              *overrides], base=recipe("debug"))


@pytest.mark.unit
def test_train_check_validates_cp():
    dims = _run_config("parallel.cp=2").check_layout(4)  # the debug recipe: tp=2, so cp=2 x tp=2
    assert (dims.dp, dims.cp, dims.tp) == (1, 2, 2)
    with pytest.raises(ConfigError, match="parallel.cp"):
        _run_config("parallel.cp=0")
    with pytest.raises(ConfigError, match="model.seq_length=30 is not divisible by 2 \\* parallel.cp = 4"):
        _run_config("parallel.cp=2", "model.seq_length=30").check_layout(4)
    with pytest.raises(ConfigError, match="world size 2 is not divisible by parallel.tp \\* parallel.pp "
                                          "\\* parallel.cp = 2 \\* 1 \\* 2 = 4"):
        _run_config("parallel.cp=2").check_layout(2)


# ------------------------------------------------------------------ processes


def _assert_matches(check: dict, name: str) -> None:
    assert check["n_grads"] == check["n_ref"], name
    assert check["ref_grad_max"] > 1e-3, name  # the comparison is not vacuous
    for key in ("logits", "loss", "grads"):
        assert check[key] <= 1.0, (name, key, check)


@pytest.fixture(scope="module")
def four():
    from distributed import run_distributed
    from cp_workers import four_process_checks

    return run_distributed(four_process_checks, world_size=4)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["rotary-gqa", "learned", "sinusoidal", "rotary-gqa-fsdp", "tp-sp-cp-fsdp"])
def test_cp2_logits_loss_and_grads_match_single_process(four, case):
    # dp=2 x cp=2 with DDP (three position kinds) and FSDP2; tp=2 + SP x cp=2 with FSDP2
    for rank, results in enumerate(four):
        _assert_matches(results[case], f"{case} rank {rank}")


@pytest.mark.distributed
def test_cp2_without_global_positions_does_not_match(four):
    # the check above can fail: rotary angles of positions 0 .. T/cp-1 on every rank are wrong
    assert four[0]["rotary-no-positions"]["logits"] > 100


@pytest.mark.distributed
def test_parallelize_gpt_refuses_a_cp_layout_without_its_mesh_or_with_compile(four):
    refused = four[0]["refusals"]
    assert "parallelize_gpt needs a 3-D mesh named ('dp', 'cp', 'tp'), got ('dp', 'tp')" in refused["mesh"]
    assert "parallel.cp=2 with parallel.compile=true" in refused["compile"]


@pytest.mark.distributed
def test_train_engine_with_cp2_matches_single_process(four):
    # build_engine for parallel.cp=2 on 4 ranks (dp=2): two micro-batches per rank, gradients
    # accumulated, DDP over the 4 dp x cp ranks; training loss, evaluation loss, gradients
    for rank, results in enumerate(four):
        check = results["engine"]
        assert check["core"] == "ContextParallelCoreAttention", rank
        assert check["loss"] <= 1.0 and check["eval"] <= 1.0 and check["grads"] <= 1.0, (rank, check)


@pytest.mark.distributed
def test_cp_swaps_the_attention_core_once_on_a_pp_dp_cp_tp_mesh(four):
    swap = four[0]["swap"]
    assert swap["cores"] == ["ContextParallelCoreAttention"] * 2
    assert "expects the model's own CoreAttention" in swap["twice"]
    assert four[0]["mesh"] == ["pp", "dp", "cp", "tp"]
    # rank r = (dp_rank * cp + cp_rank) * tp + tp_rank: cp groups of stride tp, tp groups consecutive
    assert [r["dp_cp_groups"]["cp"] for r in four] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp_cp_groups"]["dp"] for r in four] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["tp_cp_groups"]["cp"] for r in four] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["tp_cp_groups"]["tp"] for r in four] == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["1f1b-rotary-gqa", "interleaved-sinusoidal-tied", "interleaved-zb-rotary",
                                  "zbv-learned-tied", "dualpipev-rotary-tied"])
def test_pp2_cp2_pipeline_engine_matches_single_process_over_adamw_steps(four, case):
    # pp=2 x cp=2 (dp=1) through build_engine: each stage runs the rank's positions, the
    # schedule its micro-batches of the rank's chunks; 3 AdamW steps, each step's mean loss,
    # every gradient of the rank's chunks and the norm before clipping, and the evaluation loss
    from cp_workers import PIPELINE_STEPS

    names = {}
    for rank, results in enumerate(four):
        check = results[f"pp2-cp2-{case}"]
        assert (check["pp_rank"], check["cp_rank"]) == (rank // 2, rank % 2), rank
        assert len(check["losses"]) == PIPELINE_STEPS and check["ref_grad_max"] > 1e-3
        for key in ("loss", "grads", "norm", "eval"):
            assert check[key] <= 1.0, (case, rank, key, check)
        names.setdefault(check["cp_rank"], set()).update(check["names"])
    # the stages of one cp rank hold every parameter, a tied table twice (once per end)
    assert names[0] == names[1]
    assert len(names[0]) == four[0][f"pp2-cp2-{case}"]["n_ref"] + ("tied" in case)


@pytest.mark.distributed
def test_pp2_cp2_without_the_positions_does_not_match(four):
    # the pipeline check can fail: stages run at positions 0 .. T/cp-1 give other rotary
    # angles. Every stage's gradients part (measured: 280 to 560 times the bound); the tiny
    # untrained model's loss hardly depends on positions, so it is not the witness here
    wrong = [r["pp2-cp2-no-positions"] for r in four]
    assert min(w["grads"] for w in wrong) > 100 and min(w["norm"] for w in wrong) > 10


@pytest.mark.e2e
def test_train_cp2_entry_point_matches_cp1(tmp_path):
    from corpus_data import tokenized_dir, whatsnew_paragraphs
    from mtnlg import storage
    from mtnlg.cli import main as mtnlg_main

    docs = whatsnew_paragraphs(max_files=2)
    cut = len(docs) * 9 // 10
    tokenized = tokenized_dir(tmp_path / "data", docs[:cut], docs[cut:])
    args = ["--recipe", "debug", f"data.path={tokenized}", "parallel.tp=1", "model.dropout=0",
            "model.attention_dropout=0", "train.steps=3", "train.log_every=1", "train.eval_iters=1",
            "checkpoint.every=0", "schedule.decay_steps=10"]
    runs = {}
    for nproc, cp in ((2, 2), (1, 1)):
        out = str(tmp_path / f"cp{cp}")
        assert mtnlg_main(["train", "--nproc", str(nproc), *args, f"parallel.cp={cp}", f"output={out}"]) == 0
        runs[cp] = json.loads(storage.read_text(storage.join(out, "summary.json")))
        runs[cp]["log"] = [json.loads(line) for line in storage.read_text(storage.join(out, "log.jsonl")).splitlines()
                           if line]
    assert runs[2]["layout"]["cp"] == 2 and "cp" not in runs[1]["layout"]
    assert len(runs[2]["log"]) == 3
    # the same mean loss and gradient norm at each step: the cp ranks' halves make one sequence mean
    assert [r["loss"] for r in runs[2]["log"]] == pytest.approx([r["loss"] for r in runs[1]["log"]], rel=1e-5)
    assert [r["grad_norm"] for r in runs[2]["log"]] == pytest.approx([r["grad_norm"] for r in runs[1]["log"]],
                                                                     rel=1e-5)
    assert runs[2]["val_loss"] == pytest.approx(runs[1]["val_loss"], rel=1e-5)
