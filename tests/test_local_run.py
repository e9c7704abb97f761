"""`mtnlg run`'s flags reach the pipeline: inputs, workers and each step's overrides (after
the local defaults, so that they win). The whole run itself is tests/test_make_run.py."""

import json

import pytest

from mtnlg.cli import main as cli

pytestmark = pytest.mark.e2e


def test_run_flags_reach_the_pipeline(tmp_path, monkeypatch):
    import mtnlg.pipelines.gpt as gpt

    seen = {}
    monkeypatch.setattr(gpt, "gpt_pipeline", lambda **kw: seen.update(kw))
    (tmp_path / "corpus").mkdir()
    out = tmp_path / "out"
    (out / "pipeline_root").mkdir(parents=True)
    rc = cli(["run", "--output", str(out), "--input", str(tmp_path / "corpus"), "--workers", "1", "--nproc", "4",
              "--recipe", "debug", "--extract", "filters.min_words=5", "--tokenize", "vocab_size=512",
              "--train", "train.steps=8", "--fuse", "dtype=bf16", "--evaluate", "max_new_tokens=8"])
    assert rc == 0
    assert seen["inputs"] == [str(tmp_path / "corpus")] and seen["extract_workers"] == 1 and seen["nproc"] == 4
    assert seen["recipe"] == "debug"
    assert seen["extract_overrides"] == ["validation_fraction=0.05", "filters.min_words=5"]
    assert seen["tokenize_overrides"] == ["vocab_size=4096", "vocab_size=512"]
    assert seen["train_overrides"] == ["parallel.tp=2", "train.steps=8"]
    assert seen["fuse_overrides"] == ["dtype=bf16"] and seen["evaluate_overrides"] == ["max_new_tokens=8"]
    record = json.loads((out / "outputs.json").read_text())
    assert record["status"] == "SUCCEEDED" and record["error"] is None


@pytest.mark.parametrize("flags, message", [
    (["--extract", "text_feild=body"], "mtnlg run: configuration error: --extract: unknown key 'text_feild'; "
                                       "did you mean 'text_field'?"),
    (["--train", "train.setps=5"], "mtnlg run: configuration error: --train: unknown key 'train.setps'"),
    (["--tokenize", "vocab_size=ten"], "mtnlg run: configuration error: --tokenize: vocab_size: expected int"),
    (["--fuse", "dtype=fp12"], "mtnlg run: configuration error: --fuse: dtype"),
    (["--evaluate", "top_p=0"], "mtnlg run: configuration error: --evaluate: top_p"),
    (["--nproc", "1"], "mtnlg run: configuration error: --train: world size 1 is not divisible by parallel.tp * "
                       "parallel.pp = 2 * 1 = 2 (--nproc 1 training processes)"),
    (["--recipe", "tiny"], "mtnlg run: configuration error: --train: unknown recipe 'tiny'"),
    (["--input", "/no/such/corpus"], "mtnlg run: error: --input /no/such/corpus: no such file or directory"),
])
def test_every_steps_configuration_is_checked_before_anything_runs(flags, message, tmp_path, monkeypatch, capsys):
    """A mistake in any step's settings is one line naming the step's option and the key,
    and nothing starts: no pipeline, no output folder."""
    import mtnlg.pipelines.gpt as gpt

    monkeypatch.setattr(gpt, "gpt_pipeline", lambda **kw: pytest.fail("the pipeline started"))
    rc = cli(["run", "--output", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert rc == (1 if "--input" in flags else 2)
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_failing_step_ends_the_run_with_its_cause_on_one_line(tmp_path, monkeypatch, capsys):
    """kfp.local prints each step's log and then raises its own summary; the run's last line
    repeats what the failing step said last, and outputs.json records it."""
    import mtnlg.pipelines.gpt as gpt

    def failing_pipeline(**kw):
        print("    Traceback (most recent call last):\n      File \"x.py\", line 1\n"
              "    ValueError: split 'validation' has no documents to tokenize: read 0")
        print("\x1b[31mtask failed\x1b[0m")
        raise RuntimeError("Pipeline \x1b[95m'mtnlg-gpt'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. "
                           "Inner task failed: \x1b[96m'tokenize'\x1b[0m.")

    monkeypatch.setattr(gpt, "gpt_pipeline", failing_pipeline)
    out = tmp_path / "out"
    (out / "pipeline_root").mkdir(parents=True)
    assert cli(["run", "--output", str(out), "--input", str(tmp_path)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mtnlg run: error: the tokenize step failed: ValueError: split 'validation' has no "
                           "documents to tokenize: read 0 (its log is above; the run's state: "), last
    assert "\x1b" not in last
    record = json.loads((out / "outputs.json").read_text())
    assert record["status"] == "FAILED" and record["error"].startswith("the tokenize step failed: ValueError")


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    import mtnlg.pipelines.gpt as gpt

    def broken(**kw):
        raise KeyError("boom")

    monkeypatch.setattr(gpt, "gpt_pipeline", broken)
    out = tmp_path / "out"
    (out / "pipeline_root").mkdir(parents=True)
    assert cli(["run", "--output", str(out), "--input", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "mtnlg run: error: KeyError: 'boom' (run with --debug for the traceback)\n"
    with pytest.raises(KeyError):
        cli(["run", "--debug", "--output", str(out), "--input", str(tmp_path)])


def test_the_newest_runs_model_has_a_stable_path(tmp_path):
    """OUTPUT/model follows the newest run's fused model (what docs/serve.md serves), and
    never replaces a real folder of that name."""
    from mtnlg.pipelines.local import stable_link

    first, second = tmp_path / "pipeline_root" / "a" / "fuse" / "model", tmp_path / "pipeline_root" / "b" / "fuse" / "model"
    for d in (first, second):
        d.mkdir(parents=True)
        (d / "which").write_text(d.parent.parent.name)
    link = tmp_path / "model"
    assert stable_link(str(first), str(link)) == str(link) and (link / "which").read_text() == "a"
    assert stable_link(str(second), str(link)) == str(link) and (link / "which").read_text() == "b"
    assert not any(p.name.startswith("model.tmp") for p in tmp_path.iterdir())
    mine = tmp_path / "other"
    (mine / "model").mkdir(parents=True)
    assert stable_link(str(first), str(mine / "model")) == str(first) and (mine / "model").is_dir()
    assert not (mine / "model").is_symlink()
