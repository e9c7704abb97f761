"""Pipeline parallelism (``parallel.pp``) on CPU/gloo against the single-process model.

Two spawns of the tiny untied 4-layer GPT (``tests/pipeline_workers.py``): pp=2 with the
1F1B and GPipe schedules (2 processes), pp=2 x tp=2 (also with sequence parallelism and
full activation checkpointing) and pp=2 x FSDP2 dp=2 (4 processes); the zero-bubble
schedules (interleaved-zb, zbv, dualpipev, with tied embeddings; zbv also with tp=2 + sp +
full recomputation and with DDP dp=2, interleaved-zb with tp=2; each also evaluated
forward-only); each trains 3 AdamW steps with clipping on the same batches as the
single-process reference. Then runs through the real entry points: ``mtnlg train --nproc 2 ...
parallel.pp=2`` for 2 steps, resumed to 3, against ``--nproc 1`` for 3 (logged losses),
and ``mtnlg fuse`` of the pp=2 checkpoint against the same DCP checkpoint loaded into one
single-process GPT.

Tolerances: losses and clipped gradient norms within 1e-5 relative (observed: a few 1e-7;
the stages only change the reduction order of the gradient-norm sum and, with tp, of the
matmuls); fused logits bit-identical in fp32 (the fuse step only copies tensors).
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed import run_distributed
from pipeline_workers import four_process_checks, two_process_checks

pytestmark = pytest.mark.distributed

REL = 1e-5


@pytest.fixture(scope="module")
def two():
    return run_distributed(two_process_checks, world_size=2)


@pytest.fixture(scope="module")
def four():
    return run_distributed(four_process_checks, world_size=4)


def _same_training(got: dict, single: dict) -> None:
    assert got["losses"] == pytest.approx(single["losses"], rel=REL)
    assert got["grad_norms"] == pytest.approx(single["grad_norms"], rel=REL)


@pytest.mark.parametrize("layout", ["pp2-1f1b", "pp2-gpipe", "pp2-1f1b-one-micro"])
def test_pp2_training_matches_single_process(two, layout):
    for rank in two:
        _same_training(rank[layout], rank["single"])


@pytest.mark.parametrize("layout", ["pp2xtp2", "pp2xdp2-fsdp", "pp2xtp2+sp+full-ac"])
def test_pp2_x_tp2_and_x_fsdp_training_matches_single_process(four, layout):
    for rank in four:
        _same_training(rank[layout], rank["single"])


def _tied_copies_equal(ranks: list[dict], layout: str) -> None:
    first, last = ranks[0][layout], ranks[-1][layout]
    assert first["tied"] is not None and last["tied"] is not None
    # the first stage's tok_embeddings and the last stage's output copy, after 3 updates
    assert first["tied"] == last["tied"]  # sha256 of the whole table


@pytest.mark.parametrize("layout", ["pp2-tied", "pp2x2-interleaved-tied"])
def test_tied_embeddings_and_interleaved_stages_match_single_process(two, layout):
    for rank in two:
        _same_training(rank[layout], rank["single-tied"])
    _tied_copies_equal(two, layout)


@pytest.mark.parametrize("layout", ["pp2x2-interleaved-tied+tp2", "pp2x2-interleaved-tied+fsdp"])
def test_interleaved_tied_with_tp_and_fsdp_match_single_process(four, layout):
    for rank in four:
        _same_training(rank[layout], rank["single-tied"])
    _tied_copies_equal(four, layout)


ZERO_BUBBLE_TWO = ["pp2x2-interleaved-zb", "pp2x2-zbv-tied", "pp2x2-dualpipev-tied", "pp2x2-dualpipev-two-micro"]
ZERO_BUBBLE_FOUR = ["pp2x2-interleaved-zb-tied+tp2", "pp2x2-zbv-tied+dp2", "pp2x2-zbv-tied+tp2+sp+full-ac"]
# weight-gradient passes per rank: 3 steps x micro-batches x 2 chunks where every backward
# is split; DualPipeV runs some backwards whole (None: at least one split pass per rank)
WEIGHT_PASSES = {"pp2x2-interleaved-zb": 24, "pp2x2-zbv-tied": 24, "pp2x2-dualpipev-tied": None,
                 "pp2x2-dualpipev-two-micro": 12, "pp2x2-interleaved-zb-tied+tp2": 12, "pp2x2-zbv-tied+dp2": 12,
                 "pp2x2-zbv-tied+tp2+sp+full-ac": 12}


def _same_zero_bubble_training(ranks: list[dict], layout: str) -> None:
    tied = "tied" in layout
    for rank in ranks:
        _same_training(rank[layout], rank["single-tied" if tied else "single"])
        want = WEIGHT_PASSES[layout]
        # the backward really ran in two passes (input, then weight gradients)
        assert rank[layout]["weight_passes"] == want if want else rank[layout]["weight_passes"] > 0
        # forward-only runs (twice, before training) give the first training step's loss
        assert rank[layout]["evaluated"] == pytest.approx([rank[layout]["losses"][0]] * 2, rel=REL)
    if tied:  # every copy of the tied table, on every rank, equal after 3 updates
        copies = [c for rank in ranks for c in rank[layout]["tied_copies"]]
        assert len(copies) == len(ranks) and len(set(copies)) == 1  # 2 per pipeline of pp=2


@pytest.mark.parametrize("layout", ZERO_BUBBLE_TWO)
def test_zero_bubble_schedules_match_single_process(two, layout):
    _same_zero_bubble_training(two, layout)


@pytest.mark.parametrize("layout", ZERO_BUBBLE_FOUR)
def test_zero_bubble_schedules_with_tp_and_dp_match_single_process(four, layout):
    _same_zero_bubble_training(four, layout)


def test_v_schedules_place_the_first_and_last_chunk_on_rank_0(two):
    # 4 layers in 4 chunks in a V: rank 0 runs chunks 0 and 3 (embeddings and head), rank 1
    # chunks 1 and 2; the looped zero-bubble schedule keeps interleaved 1F1B's placement
    assert two[0]["pp2x2-zbv-tied"]["chunks"] == [[0], [3]]
    assert two[1]["pp2x2-zbv-tied"]["chunks"] == [[1], [2]]
    assert {"tok_embeddings.weight", "output.weight"} <= set(two[0]["pp2x2-zbv-tied"]["names"])
    assert two[1]["pp2x2-interleaved-zb"]["chunks"] == [[1], [3]]


@pytest.mark.parametrize("kw, message", [
    ({"pp": 2, "pp_schedule": "interleaved-zb"},
     "parallel.pp_schedule=interleaved-zb runs virtual stages; it needs parallel.pp_virtual >= 2, got 1"),
    ({"pp": 2, "pp_virtual": 3, "pp_schedule": "zbv"},
     "parallel.pp_schedule=zbv holds 2 stages per rank in a V (rank r: stages r and 2*pp-1-r); it needs "
     "parallel.pp_virtual=2, got 3"),
    ({"pp": 2, "pp_schedule": "dualpipev"}, "parallel.pp_schedule=dualpipev holds 2 stages per rank"),
    ({"pp": 2, "pp_virtual": 2, "pp_schedule": "zbv", "fsdp": True},
     "parallel.pp_schedule=zbv with parallel.fsdp=true gives wrong gradients"),
    ({"pp": 2, "pp_virtual": 2, "pp_schedule": "interleaved-zb", "compile": True},
     "parallel.pp_schedule=interleaved-zb splits the backward into input and weight gradients"),
    ({"pp": 2, "pp_virtual": 2, "pp_schedule": "gpipe"}, "parallel.pp_virtual=2 runs interleaved 1F1B"),
])
def test_zero_bubble_layouts_that_cannot_run_are_refused_before_launch(kw, message):
    from mtnlg.config import ConfigError
    from mtnlg.parallel.config import ParallelConfig

    with pytest.raises(ConfigError) as e:
        ParallelConfig(**kw)
    assert message in str(e.value)


def test_bubble_formulas_match_the_schedules_plans_at_equal_times():
    # docs/performance.md's formulas against torch's own per-rank action lists, played
    # with unit-time forward, input- and weight-gradient passes (no processes)
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "pipeline_bubble.py"
    spec = importlib.util.spec_from_file_location("pipeline_bubble", path)
    bubble = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bubble)
    assert bubble.check(ps=(2, 3, 4), extra_m=1) == []
    # and they say what the issue is about: on 2 ranks at 4 micro-batches, 20% idle with
    # 1F1B, 4% with every zero-bubble schedule
    assert bubble.simulate("1f1b", 2, 4) == pytest.approx(0.2)
    for schedule in ("interleaved-zb", "zbv", "dualpipev"):
        assert bubble.simulate(schedule, 2, 4) == pytest.approx(1 / 25)


def test_interleaved_ranks_hold_every_other_chunk(two):
    # 4 layers in pp * v = 4 chunks: rank 0 runs chunks 0 and 2, rank 1 chunks 1 and 3
    assert two[0]["pp2x2-interleaved-tied"]["chunks"] == [[0], [2]]
    assert two[1]["pp2x2-interleaved-tied"]["chunks"] == [[1], [3]]
    names0 = two[0]["pp2x2-interleaved-tied"]["names"]
    assert "tok_embeddings.weight" in names0 and "output.weight" not in names0
    assert {n.split(".")[1] for n in names0 if n.startswith("layers.")} == {"0", "2"}


def test_stages_keep_global_parameter_names_and_split_the_model(two):
    first, last = two[0]["pp2-1f1b"], two[1]["pp2-1f1b"]
    assert (first["pp_rank"], last["pp_rank"]) == (0, 1)
    assert "tok_embeddings.weight" in first["names"] and "output.weight" in last["names"]
    assert {n.split(".")[1] for n in first["names"] if n.startswith("layers.")} == {"0", "1"}
    assert {n.split(".")[1] for n in last["names"] if n.startswith("layers.")} == {"2", "3"}
    assert not set(first["names"]) & set(last["names"])


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> str:
    from corpus_data import tokenized_dir, whatsnew_paragraphs

    docs = whatsnew_paragraphs(max_files=3)
    cut = len(docs) * 9 // 10
    return tokenized_dir(tmp_path_factory.mktemp("ppdata"), docs[:cut], docs[cut:])


def test_train_pp2_entry_point_matches_pp1_and_fuses(tokenized, tmp_path, monkeypatch):
    from mtnlg import storage
    from mtnlg.cli import main as mtnlg_main
    from mtnlg.formats.checkpoint import resolve_checkpoint
    from mtnlg.formats.fused import load_fused
    from mtnlg.fuse.fuse import fixed_batch, reference_logits

    # tied embeddings (the debug preset's), 4 layers in pp=2 x 2 virtual stages
    args = ["--recipe", "debug", f"data.path={tokenized}", "model.num_layers=4",
            "parallel.tp=1", "train.log_every=1", "train.eval_iters=1", "checkpoint.every=0",
            "schedule.decay_steps=10"]
    runs = {}
    # pp=2: 2 steps, then resumed from its checkpoint (weights, flattened optimizer state)
    # to 3; pp=1: 3 steps uninterrupted
    for nproc, pp, steps in ((2, 2, 2), (2, 2, 3), (1, 1, 3)):
        out = str(tmp_path / f"pp{pp}")
        assert mtnlg_main(["train", "--nproc", str(nproc), *args, f"parallel.pp={pp}", f"output={out}",
                           f"parallel.pp_virtual={pp}", f"train.steps={steps}"]) == 0
        runs[pp] = json.loads(storage.read_text(storage.join(out, "summary.json")))
        runs[pp]["losses"] = [json.loads(line)["loss"] for line in
                              storage.read_text(storage.join(out, "log.jsonl")).splitlines() if line]
    assert runs[2]["layout"]["pp"] == 2 and runs[2]["layout"]["pp_virtual"] == 2
    assert len(runs[2]["losses"]) == 3 and runs[2]["resumed_from"]
    assert runs[2]["losses"] == pytest.approx(runs[1]["losses"], rel=REL)
    assert runs[2]["val_loss"] == pytest.approx(runs[1]["val_loss"], rel=REL)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fused = str(tmp_path / "fused")
    assert mtnlg_main(["fuse", str(tmp_path / "pp2"), "--output", fused, "--no-hf"]) == 0
    model, cfg, _ = load_fused(fused, decode_layout=False)
    tokens = fixed_batch(cfg)
    with torch.no_grad():
        got = model(tokens)
    # the pp=2 DCP checkpoint loaded into one whole GPT, by global names
    assert torch.equal(got, reference_logits(resolve_checkpoint(str(tmp_path / "pp2")), cfg, tokens))
