"""``mtnlg submit`` with the real ``kfp.Client`` against a loopback KFP API that records
every request: a new pipeline, a new version, parameters, runs, recurring runs, --wait."""

from __future__ import annotations

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


def test_the_ci_retrain_workflow_compiles_submits_and_waits():
    from pathlib import Path

    wf = yaml.safe_load((Path(__file__).resolve().parent.parent / ".github" / "workflows" / "retrain.yml").read_text())
    triggers = wf[True] if True in wf else wf["on"]                 # YAML 1.1 reads `on:` as True
    assert "schedule" in triggers and "manifests/run-config.yaml" in triggers["push"]["paths"]
    run = " ".join(step.get("run", "") for step in wf["jobs"]["retrain"]["steps"])
    assert "mtnlg submit" in run and "--wait" in run
    env = next(s["env"] for s in wf["jobs"]["retrain"]["steps"] if "env" in s)
    assert set(env) >= {"KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN"}
