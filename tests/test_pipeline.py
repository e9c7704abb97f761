"""The compiled kfp v2 pipeline: DAG shape, images, nothing installed at run time."""

import yaml

from mtnlg.cli import main as cli
from mtnlg.images import DATA_IMAGE, TRAIN_IMAGE
import pytest

pytestmark = pytest.mark.unit


def _compile(tmp_path):
    out = tmp_path / "pipeline.yaml"
    assert cli(["compile", "-o", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def test_compiled_dag(tmp_path):
    ir = _compile(tmp_path)
    assert ir["pipelineInfo"]["name"] == "mtnlg-gpt"
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {"extract", "tokenize", "train", "fuse", "evaluate"}
    assert tasks["tokenize"]["dependentTasks"] == ["extract"]
    assert tasks["train"]["dependentTasks"] == ["tokenize"]
    assert tasks["fuse"]["dependentTasks"] == ["train"]
    assert sorted(tasks["evaluate"]["dependentTasks"]) == ["fuse", "tokenize", "train"]
    tok_in = tasks["tokenize"]["inputs"]["artifacts"]["extracted"]["taskOutputArtifact"]
    assert tok_in == {"outputArtifactKey": "dataset", "producerTask": "extract"}
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["train_overrides"]["defaultValue"] == ["parallel.tp=2"]
    assert params["recipe"]["defaultValue"] == "debug"


def test_components_run_from_our_images_and_install_nothing(tmp_path):
    ir = _compile(tmp_path)
    execs = ir["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in execs.items()}
    assert images["exec-extract"] == DATA_IMAGE and images["exec-tokenize"] == DATA_IMAGE
    assert images["exec-train"] == images["exec-fuse"] == images["exec-evaluate"] == TRAIN_IMAGE
    for name, e in execs.items():
        script = " ".join(e["container"]["command"])
        assert "pip install" not in script, name
        assert "from mtnlg.steps import" in script, name


def test_component_outputs_are_typed_artifacts(tmp_path):
    ir = _compile(tmp_path)
    comps = ir["components"]
    def outs(c):
        return {k: v["artifactType"]["schemaTitle"] for k, v in comps[c]["outputDefinitions"]["artifacts"].items()}
    assert outs("comp-extract") == {"dataset": "system.Dataset", "metrics": "system.Metrics"}
    assert outs("comp-tokenize") == {"tokens": "system.Dataset", "tokenizer": "system.Model",
                                     "metrics": "system.Metrics"}
    assert outs("comp-train") == {"checkpoint": "system.Model", "metrics": "system.Metrics"}
    assert outs("comp-fuse") == {"model": "system.Model", "metrics": "system.Metrics"}
    assert outs("comp-evaluate") == {"metrics": "system.Metrics", "report": "system.HTML",
                                     "summary": "system.Markdown"}
