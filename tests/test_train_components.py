"""The trainer's components on their own: state, cadences, the non-finite guard, the config's
vocabulary from the tokenizer, and the step interface's result."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from mtnlg.config import load_config
from mtnlg.model.config import ModelConfig
from mtnlg.parallel.config import ParallelConfig
from mtnlg.parallel.dims import ParallelDims
from mtnlg.steps import StepOutput
from mtnlg.train.config import TrainRunConfig, recipe
from mtnlg.train.data import with_tokenizer_vocab
from mtnlg.train.state import NonFiniteGuard, StepResult, TrainingDiverged, TrainState

pytestmark = pytest.mark.unit


def _result(loss: float) -> StepResult:
    import torch

    return StepResult(loss=torch.tensor(loss), finite=torch.tensor(math.isfinite(loss)), lr=1e-3,
                      grad_norm=torch.tensor(1.0), batch_size=8, stop=False)


def test_train_state_round_trips_like_a_stateful():
    s = TrainState(step=7, consumed_samples=56, skipped_steps=1)
    t = TrainState()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t == s and s.state_dict() == {"step": 7, "consumed_samples": 56, "skipped_steps": 1}


def test_non_finite_guard_counts_runs_and_resets():
    g = NonFiniteGuard(max_steps=3, verbose=False)
    for step, loss in ((1, 2.0), (2, float("nan")), (3, float("inf"))):
        g.add(step, _result(loss))
    assert g.in_a_row == 0 and g.pending  # nothing read until a sync
    state = TrainState()
    g.sync(state)
    assert state.skipped_steps == 2 and g.in_a_row == 2 and not g.pending
    g.add(4, _result(1.5))                  # a finite step resets the run
    g.sync(state)
    assert state.skipped_steps == 2
    assert g.in_a_row == 0 and g.last_finite == (4, 1.5)
    for step in (5, 6, 7):
        g.add(step, _result(float("nan")))
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row \(steps 5-7.*last finite loss 1.5000 at step 4"):
        g.sync(state)
    assert state.skipped_steps == 5


def _cfg(*overrides: str) -> TrainRunConfig:
    return load_config(TrainRunConfig, None, ["data.path=/d", "output=/o", *overrides], base=recipe("debug"))


def test_checkpoint_validation_and_log_cadence():
    from mtnlg.train.checkpointer import Checkpointer
    from mtnlg.train.metrics import MetricsProcessor
    from mtnlg.train.validator import Validator

    cfg = _cfg("checkpoint.every=4", "train.eval_every=5", "train.log_every=3", "train.steps=12")
    ck = Checkpointer(cfg, None, None, TrainState(), None, False, {}, verbose=False)
    saved = []
    ck.save = lambda background=False: saved.append(ck.state.step) or "x"     # no files: cadence only
    for step in range(1, 13):
        ck.state.step = step
        ck.maybe_save(step, last_step=step == 12)
    assert saved == [4, 8]                                                        # the last is finish()'s
    v = Validator(cfg.train, engine=None, dataset=object(), dp_rank=0, dp=1)
    assert [s for s in range(1, 13) if v.should_validate(s, s == 12)] == [5, 10, 12]
    assert not Validator(cfg.train, None, None, 0, 1).should_validate(12, True)  # no validation split
    m = MetricsProcessor(cfg, enabled=False, describe={})
    m.start(TrainState(step=2), "")
    assert [s for s in range(3, 13) if m.should_log(s, s == 12, False)] == [3, 6, 9, 12]


def test_layout_as_data_and_vocabulary_from_the_tokenizer(tmp_path):
    dims = ParallelDims.build(ParallelConfig(tp=2), 4, ModelConfig(hidden_size=64, num_heads=4))
    assert dims.as_dict() == {"tp": 2, "dp": 2, "pp": 1, "sequence_parallel": False, "fsdp": False}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"vocab_size": 777}))
    cfg = load_config(TrainRunConfig, None, [f"data.path={tmp_path}", "output=/o"], base=recipe("debug"))
    out = with_tokenizer_vocab(cfg, verbose=False)
    assert out.model.vocab_size == 777 and cfg.model.vocab_size != 777  # a checked copy, not a patch
    assert with_tokenizer_vocab(out, verbose=False) is out
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: no readable vocab_size"):
        with_tokenizer_vocab(cfg, verbose=False)


def test_step_output_metrics_are_the_numeric_figures():
    r = StepOutput("/out", {"kept": 3, "dropped": {"short": 1}, "note": "x", "loss": float("nan")})
    assert r.metrics() == {"kept": 3, "dropped.short": 1}


def test_engines_share_one_interface():
    from mtnlg.train.engine import Engine, LocalEngine, PipelineEngine

    for cls in (LocalEngine, PipelineEngine):
        assert issubclass(cls, Engine) and not cls.__abstractmethods__
    assert PipelineEngine.flatten_optimizer and not LocalEngine.flatten_optimizer
    dims = SimpleNamespace(world_size=4, pp=1, tp=2)
    assert LocalEngine(None, dims, None, "fp32", 1, None).loss_ranks == 4


def test_s3_run_directory_and_data_prefixes(s3):
    """An s3:// run directory is written locally and uploaded (RunFiles); s3:// blend
    prefixes are used as given, relative ones joined onto data.path."""
    from mtnlg import storage
    from mtnlg.train.config import BlendSource, DataConfig
    from mtnlg.train.data import _prefixes
    from mtnlg.train.metrics import RunFiles

    storage.write_text(f"{s3}/run/log.jsonl", '{"step": 1}\n')
    files = RunFiles(f"{s3}/run")
    assert files.remote and not files.local.startswith("s3:")
    files.fetch("log.jsonl")  # a resumed run's log comes back first
    with open(files.path("log.jsonl"), "a") as f:
        f.write('{"step": 2}\n')
    files.sync()
    files.close()
    assert storage.read_text(f"{s3}/run/log.jsonl") == '{"step": 1}\n{"step": 2}\n'

    d = DataConfig(path=f"{s3}/tok", blend=[BlendSource(prefix="s3://other/web/train", weight=2.0),
                                            BlendSource(prefix="books/train")])
    assert _prefixes(d) == (["s3://other/web/train", f"{s3}/tok/books/train"], [2.0, 1.0], f"{s3}/tok/validation")
