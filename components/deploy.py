"""kfp component: the deploy step -> a KServe InferenceService for the fused model, behind a gate."""

from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Metrics, Model, Output

from mtnlg.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def deploy(model: Input[Model], report: Input[HTML], name: str, overrides: list, registry_overrides: list,
           run_id: str, decision: Output[Markdown], metrics: Output[Metrics]):
    """Serve the fused model with KServe's Hugging Face runtime (OpenAI-compatible API) when
    its evaluation passes the gate; optionally register it in the Kubeflow Model Registry.

    Args:
        model: the fuse step's model directory (its hf/ export is served).
        report: the evaluate step's report (its metrics.json decides the gate).
        name: the InferenceService's name (created, or updated when it is ours).
        overrides: DeployConfig settings as key=value (e.g. "max_val_perplexity=300", "gpus=1",
            "backend=huggingface", "service_account=kserve-gcs", "fail_on_gate=true").
        registry_overrides: RegistryConfig settings as key=value; "url=..." enables registration
            (e.g. "url=https://model-registry-service.kubeflow.svc.cluster.local:8443").
        run_id: the pipeline run's id, recorded on the service and the registered version.
    """
    from mtnlg.cluster.incluster import pod_namespace
    from mtnlg.cluster.registry import RegistryConfig
    from mtnlg.cluster.serving import DeployConfig
    from mtnlg.components.artifacts import artifact_location, log_metrics
    from mtnlg.config import load_config
    from mtnlg.steps import DeployInputs, deploy_step

    config = load_config(DeployConfig, overrides=overrides, base={"name": name, "namespace": pod_namespace()})
    registry = load_config(RegistryConfig, overrides=registry_overrides)
    inputs = DeployInputs(artifact_location(model), artifact_location(report) + ".d")
    out = artifact_location(decision) + ".d"
    result = deploy_step(inputs, out, config, run_id=run_id, registry=registry)
    from mtnlg import storage

    storage.copy(storage.join(out, "decision.md"), artifact_location(decision))
    decision.metadata["deployed"] = bool(result.stats["deployed"])
    log_metrics(metrics, result)
