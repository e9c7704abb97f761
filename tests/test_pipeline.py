"""The compiled kfp v2 pipeline, for each training backend: DAG shape, images, nothing
installed at run time, the train step's resources or launcher, retries and caching."""

import pytest
import yaml

from mtnlg.cli import main as cli
from mtnlg.images import DATA_IMAGE, TRAIN_IMAGE

pytestmark = pytest.mark.unit

BACKENDS = ("pod", "trainjob", "pytorchjob")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = {}
    for backend in BACKENDS:
        path = tmp_path_factory.mktemp("ir") / f"{backend}.yaml"
        assert cli(["compile", "--train-backend", backend, "-o", str(path)]) == 0
        out[backend] = yaml.safe_load(path.read_text())   # one document: no platform config
    default = tmp_path_factory.mktemp("ir") / "default.yaml"
    assert cli(["compile", "-o", str(default)]) == 0
    out["default"] = yaml.safe_load(default.read_text())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_dag(compiled, backend):
    ir = compiled[backend]
    assert ir["pipelineInfo"]["name"] == "mtnlg-gpt"
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {"extract", "tokenize", "train", "fuse", "evaluate"}
    assert tasks["tokenize"]["dependentTasks"] == ["extract"]
    assert tasks["train"]["dependentTasks"] == ["tokenize"]
    assert tasks["fuse"]["dependentTasks"] == ["train"]
    assert sorted(tasks["evaluate"]["dependentTasks"]) == ["fuse", "tokenize", "train"]
    tok_in = tasks["tokenize"]["inputs"]["artifacts"]["extracted"]["taskOutputArtifact"]
    assert tok_in == {"outputArtifactKey": "dataset", "producerTask": "extract"}
    # a retried train step resumes from its checkpoint; extract always reads its inputs anew
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert not tasks["extract"]["cachingOptions"].get("enableCache", False)
    params = ir["root"]["inputDefinitions"]["parameters"]
    for p in ("fuse_overrides", "evaluate_overrides", "tokenize_overrides", "extract_overrides", "inputs",
              "vocab_size", "model_preset", "num_layers", "hidden_size", "num_heads", "tp", "pp", "steps"):
        assert p in params, p
    named = tasks["train"]["inputs"]["parameters"]
    assert named["tp"]["componentInputParameter"] == "tp" and named["steps"]["componentInputParameter"] == "steps"
    assert tasks["tokenize"]["inputs"]["parameters"]["vocab_size"]["componentInputParameter"] == "vocab_size"


def test_the_default_backend_is_trainjob(compiled):
    assert compiled["default"] == compiled["trainjob"]


def test_pod_backend_requests_its_gpus_from_parameters(compiled):
    ir = compiled["pod"]
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["tp"]["defaultValue"] == 2 and params["train_overrides"]["defaultValue"] == []
    assert params["recipe"]["defaultValue"] == "debug" and params["gpus"]["defaultValue"] == 0
    res = ir["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    assert "pipelinechannel--gpus" in res["resourceCount"] and "pipelinechannel--accelerator" in res["resourceType"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_step_requests_and_is_limited_to_cpu_and_memory_from_parameters(compiled, backend):
    """Requests equal limits (Guaranteed QoS) on every step, each from its own pipeline
    parameters; fuse and evaluate memory is sized by the default recipe's model."""
    ir = compiled[backend]
    params = ir["root"]["inputDefinitions"]["parameters"]
    for step in ("extract", "tokenize", "train", "fuse", "evaluate"):
        res = ir["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        for kind in ("cpu", "memory"):
            channel = f"{{{{$.inputs.parameters['pipelinechannel--{step}_{kind}']}}}}"
            field = "Cpu" if kind == "cpu" else "Memory"
            assert res[f"resource{field}Request"] == res[f"resource{field}Limit"] == channel, (step, kind, res)
            assert params[f"{step}_{kind}"]["parameterType"] == "STRING"
    defaults = {k: params[k]["defaultValue"] for k in params if k.endswith(("_cpu", "_memory"))}
    if backend == "pod":   # torchrun in the train step's pod; the debug recipe's tiny model
        assert defaults["train_cpu"] == "4" and defaults["fuse_memory"] == "2Gi"
    else:                  # a launcher; mtnlg-1.3b: 5.2 GB of fp32 weights, three copies in fuse
        assert defaults["train_cpu"] == "500m" and defaults["train_memory"] == "1Gi"
        assert defaults["fuse_memory"] == "16Gi" and defaults["evaluate_memory"] == "11Gi"


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_job_backends_launch_nodes_times_gpus(compiled, backend):
    ir = compiled[backend]
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["nodes"]["defaultValue"] == 2 and params["gpus_per_node"]["defaultValue"] == 8
    train = ir["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train["backend"]["runtimeValue"]["constant"] == backend
    assert train["nodes"]["componentInputParameter"] == "nodes"
    assert train["gpus_per_node"]["componentInputParameter"] == "gpus_per_node"
    assert train["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"   # job name per run
    for name in ("queue_name", "priority_class"):   # Kueue: none unless the run names them
        assert params[name] == {"defaultValue": "", "isOptional": True, "parameterType": "STRING"}
        assert train[name]["componentInputParameter"] == name
    script = " ".join(ir["deploymentSpec"]["executors"]["exec-train"]["container"]["command"])
    assert "train_job_step" in script and "pod_owner" in script
    # the launcher pod itself needs no GPU (the job's pods do): a CPU and memory request only
    assert "accelerator" not in ir["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_components_run_from_our_images_and_install_nothing(compiled, backend):
    execs = compiled[backend]["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in execs.items()}
    assert images["exec-extract"] == DATA_IMAGE and images["exec-tokenize"] == DATA_IMAGE
    assert images["exec-train"] == images["exec-fuse"] == images["exec-evaluate"] == TRAIN_IMAGE
    for name, e in execs.items():
        script = " ".join(e["container"]["command"])
        assert "pip install" not in script, name
        assert "from mtnlg.steps import" in script, name


def test_component_outputs_are_typed_artifacts(compiled):
    comps = compiled["trainjob"]["components"]

    def outs(c):
        return {k: v["artifactType"]["schemaTitle"] for k, v in comps[c]["outputDefinitions"]["artifacts"].items()}
    assert outs("comp-extract") == {"dataset": "system.Dataset", "metrics": "system.Metrics"}
    assert outs("comp-tokenize") == {"tokens": "system.Dataset", "tokenizer": "system.Model",
                                     "metrics": "system.Metrics"}
    assert outs("comp-train") == {"checkpoint": "system.Model", "metrics": "system.Metrics"}
    assert outs("comp-fuse") == {"model": "system.Model", "metrics": "system.Metrics"}
    assert outs("comp-evaluate") == {"metrics": "system.Metrics", "report": "system.HTML",
                                     "summary": "system.Markdown"}


def test_a_shared_volume_is_mounted_on_the_launcher(tmp_path):
    path = tmp_path / "pvc.yaml"
    assert cli(["compile", "--volume-claim", "shared-rwx", "--volume-mount", "/mnt/shared", "-o", str(path)]) == 0
    ir_docs = list(yaml.safe_load_all(path.read_text()))
    platform = ir_docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert platform["pvcMount"][0]["mountPath"] == "/mnt/shared"
    assert platform["pvcMount"][0]["constant"] == "shared-rwx"
    train = ir_docs[0]["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train["volume_claim"]["runtimeValue"]["constant"] == "shared-rwx"
    assert cli(["compile", "--train-backend", "pod", "--volume-claim", "x", "-o", str(path)]) == 1


@pytest.mark.parametrize("backend", ["pod", "trainjob"])
def test_deploy_step_when_compiled_with_deploy(tmp_path, backend):
    """--deploy adds the gated KServe step after evaluate, fed by fuse's model and evaluate's
    report, from our image; without it there is none."""
    path = tmp_path / f"{backend}.yaml"
    assert cli(["compile", "--train-backend", backend, "--deploy", "-o", str(path)]) == 0
    ir = yaml.safe_load(path.read_text())
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {"extract", "tokenize", "train", "fuse", "evaluate", "deploy"}
    dep = tasks["deploy"]
    assert sorted(dep["dependentTasks"]) == ["evaluate", "fuse"]
    arts = dep["inputs"]["artifacts"]
    assert arts["model"]["taskOutputArtifact"] == {"outputArtifactKey": "model", "producerTask": "fuse"}
    assert arts["report"]["taskOutputArtifact"] == {"outputArtifactKey": "report", "producerTask": "evaluate"}
    params = dep["inputs"]["parameters"]
    assert params["overrides"]["componentInputParameter"] == "deploy_overrides"
    assert params["registry_overrides"]["componentInputParameter"] == "registry_overrides"
    assert params["name"]["componentInputParameter"] == "deploy_name"
    assert params["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    execs = ir["deploymentSpec"]["executors"]
    assert execs["exec-deploy"]["container"]["image"] == TRAIN_IMAGE
    assert "pip install" not in " ".join(execs["exec-deploy"]["container"]["command"])
    outs = ir["components"]["comp-deploy"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outs.items()} == {"decision": "system.Markdown",
                                                                               "metrics": "system.Metrics"}


def test_compiled_for_kfps_own_store_every_step_gets_its_endpoint_and_keys(tmp_path):
    """`mtnlg compile --kfp-store-endpoint URL`: each step reads and writes Kubeflow
    Pipelines' minio:// root over S3 (the endpoint as an environment variable, the keys from
    the store's Secret through kfp-kubernetes), so the train step's job can be given them."""
    path = tmp_path / "ir.yaml"
    assert cli(["compile", "--kfp-store-endpoint", "http://minio-service.kubeflow:9000", "-o", str(path)]) == 0
    ir, platform = yaml.safe_load_all(path.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("extract", "tokenize", "train", "fuse", "evaluate"):
        env = {e["name"]: e["value"] for e in ir["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["env"]}
        assert env == {"AWS_ENDPOINT_URL_S3": "http://minio-service.kubeflow:9000",
                       "MTNLG_S3_SECRET": "mlpipeline-minio-artifact"}, step
        (secret,) = executors[f"exec-{step}"]["secretAsEnv"]
        assert secret["secretName"] == "mlpipeline-minio-artifact"
        assert {k["secretKey"]: k["envVar"] for k in secret["keyToEnv"]} == {
            "accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
    assert cli(["compile", "--kfp-store-endpoint", "minio-service:9000", "-o", str(path)]) == 1
