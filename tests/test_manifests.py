"""The kustomize base, overlays and components: they render, every object validates strictly
(CRD schemas for the jobs, kubernetes-validate for built-in kinds), an overlay creates only
the RBAC and the launcher's Role is exactly what the launcher calls, the cloud identity
components annotate the service accounts, and the example jobs are what `mtnlg job`
generates (and meet the restricted Pod Security Standard)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mtnlg.cli import main as mtnlg_main
from mtnlg.cluster.jobs import check_webhook_rules, pod_security_level
from mtnlg.cluster.schema import load_crd_schema, validate_object

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
SCHEMAS = ROOT.parent / "shared" / "schemas"
CRDS = {"trainjob": "trainer.kubeflow.org_trainjobs.yaml", "pytorchjob": "kubeflow.org_pytorchjobs.yaml"}
GROUPS = {"trainjob": ("trainer.kubeflow.org", "trainjobs"), "pytorchjob": ("kubeflow.org", "pytorchjobs")}
K8S_VERSION = "1.32"


def render(folder: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: cannot render kustomize")
    out = subprocess.run(["kubectl", "kustomize", str(MANIFESTS / folder)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_example_job_is_what_mtnlg_job_generates(backend, tmp_path, capsys):
    committed = yaml.safe_load((MANIFESTS / "examples" / f"{backend}.yaml").read_text())
    assert mtnlg_main(["job", "--backend", backend, "--name", "mtnlg-train", "--nodes", "2", "--gpus-per-node", "8",
                       "--config", str(MANIFESTS / "examples" / "run-config.yaml"), "-o", "-"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == committed
    check_webhook_rules(committed)
    if (SCHEMAS / CRDS[backend]).exists():
        validate_object(committed, load_crd_schema(SCHEMAS / CRDS[backend]))
    assert "serviceAccountName: mtnlg-trainer" in yaml.safe_dump(committed)
    assert pod_security_level(committed) == ("restricted", [])


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_overlay_renders_and_grants_exactly_what_the_launcher_needs(backend):
    import kubernetes_validate

    objects = render(f"overlays/{backend}")
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted([("ServiceAccount", "mtnlg-launcher"), ("ServiceAccount", "mtnlg-trainer"),
                            ("Role", "mtnlg-launcher"), ("RoleBinding", "mtnlg-launcher")])   # RBAC only
    assert {o["metadata"]["namespace"] for o in objects} == {"kubeflow"}
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)       # unknown fields rejected
        assert "annotations" not in o["metadata"]                       # no cloud identity unless asked
    role = next(o for o in objects if o["kind"] == "Role")
    group, plural = GROUPS[backend]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    needed = {(group, plural, v) for v in ("create", "get", "list", "watch", "delete")} | {
        ("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get"), ("", "events", "list")} | {
        ("serving.kserve.io", "inferenceservices", v) for v in ("create", "get", "list", "watch", "update")}
    assert granted == needed                                             # nothing more: no patch, no status
    trainer_sa = next(o for o in objects if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "mtnlg-trainer")
    assert trainer_sa["automountServiceAccountToken"] is False           # the job's pods hold no API token
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert {s["name"] for s in binding["subjects"]} == {"mtnlg-launcher", "pipeline-runner"}


@pytest.mark.parametrize("example, key, value", [
    ("gke", "iam.gke.io/gcp-service-account", "mtnlg@my-project.iam.gserviceaccount.com"),
    ("eks", "eks.amazonaws.com/role-arn", "arn:aws:iam::123456789012:role/mtnlg-training"),
])
def test_cloud_identity_components_annotate_both_service_accounts(example, key, value):
    """The example overlays use the component and set their own identity over its placeholder."""
    import kubernetes_validate

    objects = render(f"examples/{example}")
    accounts = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceAccount"}
    assert {n: a["metadata"]["annotations"] for n, a in accounts.items()} == {
        "mtnlg-launcher": {key: value}, "mtnlg-trainer": {key: value}}
    assert accounts["mtnlg-trainer"]["automountServiceAccountToken"] is False
    assert sorted(o["kind"] for o in objects) == ["Role", "RoleBinding", "ServiceAccount", "ServiceAccount"]
    for o in objects:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_kubernetes_validate_rejects_a_misspelt_builtin_field():
    import kubernetes_validate

    with pytest.raises(kubernetes_validate.ValidationError, match="automountServiceAcountToken"):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"},
                                      "automountServiceAcountToken": False}, K8S_VERSION, strict=True)
