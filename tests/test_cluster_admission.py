"""Admission as the cluster does it: the CRDs' CEL rules (every one compiles, real ones
refuse with their messages), the operators' webhook rules, the names of the pods a job's
operator will create, `mtnlg job` and the deploy config refusing before anything is
written, and the API emulator answering a bad object as the API server does."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import kubernetes
import pytest
from kube_emulator import INFERENCESERVICES, PYTORCHJOBS, TRAINJOBS, KubeEmulator
from kubernetes.client.rest import ApiException

from mtnlg.cluster import cel
from mtnlg.cluster.admission import AdmissionError, admit
from mtnlg.cluster.jobs import ClusterJobConfig, build_job
from mtnlg.cluster.schema import load_crd_schema
from mtnlg.cluster.serving import DeployConfig, inference_service
from mtnlg.config import ConfigError, load_config
from mtnlg.train.config import TrainRunConfig, recipe

pytestmark = pytest.mark.unit

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
CRDS = {"TrainJob": "trainer.kubeflow.org_trainjobs.yaml", "PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
        "InferenceService": "serving.kserve.io_inferenceservices.yaml",
        "ClusterTrainingRuntime": "trainer.kubeflow.org_clustertrainingruntimes.yaml"}
NS = "team-a"


def schema(kind: str) -> dict:
    path = SCHEMAS / CRDS[kind]
    if not path.exists():
        pytest.skip(f"CRD not found at {path}")
    return load_crd_schema(path)


def run_config() -> TrainRunConfig:
    return load_config(TrainRunConfig, None, ["data.path=gs://b/tokens", "output=s3://b/runs/x",
                                              "train.global_batch_size=64", "train.micro_batch_size=1",
                                              "parallel.tp=2"], base=recipe("debug"))


def job(backend: str = "trainjob", name: str = "gpt-test", nodes: int = 2) -> dict:
    return build_job(ClusterJobConfig(name=name, backend=backend, nodes=nodes, gpus_per_node=8, namespace=NS),
                     run_config())


def refused(obj: dict, crd: dict | None = None, **kw) -> AdmissionError:
    with pytest.raises(AdmissionError) as e:
        admit(obj, crd, **kw)
    return e.value


# ------------------------------------------------------------------ the CEL rules


@pytest.mark.parametrize("kind, count", [("TrainJob", 19), ("PyTorchJob", 1), ("InferenceService", 0),
                                         ("ClusterTrainingRuntime", 11)])
def test_every_cel_rule_of_the_crds_compiles(kind, count):
    s = schema(kind)
    assert cel.check_rules(s) == count == len(cel.rules_of(s))
    for _, rule in cel.rules_of(s):
        cel.compile_rule(rule["rule"])


def test_a_rule_that_does_not_compile_is_an_error_not_skipped():
    bad = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"},
                                                  "x-kubernetes-validations": [{"rule": "self.isSorted()"}]}}}
    with pytest.raises(cel.RuleCompileError, match=r"\.a: 'self.isSorted\(\)' uses function isSorted\(\)"):
        cel.evaluate(bad, {"a": [2, 1]})
    with pytest.raises(cel.RuleCompileError, match="does not parse"):
        cel.compile_rule("self.a ==")


def test_message_expression_field_path_reason_and_optional_old_self():
    s = {"type": "object", "properties": {
        "n": {"type": "integer"},
        "x": {"type": "number", "x-kubernetes-validations": [{"rule": "self > 0.5", "message": "x too small"}]}},
         "x-kubernetes-validations": [
             {"rule": "self.n < 10", "messageExpression": "'n is ' + string(self.n)", "fieldPath": ".n",
              "reason": "FieldValueForbidden"},
             {"rule": "self.missing == 1"},                             # fails to evaluate
             {"rule": "!oldSelf.hasValue() || self.n >= oldSelf.value().n", "optionalOldSelf": True,
              "message": "n may only grow"},
             {"rule": "self.n == oldSelf.n", "message": "n is immutable"}]}
    got = [(f.path, f.reason, f.message) for f in cel.evaluate(s, {"n": 12, "x": 1})]  # 1 is a CEL double here
    assert got == [("n", "FieldValueForbidden", "n is 12"),
                   ("<nil>", "FieldValueInvalid", "no such key: missing evaluating rule: self.missing == 1")]
    assert [f.message for f in cel.evaluate(s, {"n": 3, "x": 0})][-1] == "x too small"
    assert [f.message for f in cel.evaluate(s, {"n": 3, "x": 0, "missing": 1}, {"n": 5, "x": 0, "missing": 1})] == [
        "n may only grow", "n is immutable"]  # the unchanged x is not checked again (ratcheting)


def test_valid_generated_objects_are_admitted():
    for backend, kind in (("trainjob", "TrainJob"), ("pytorchjob", "PyTorchJob")):
        for nodes in (1, 4):
            assert admit(job(backend, nodes=nodes), schema(kind)) == []
    dc = DeployConfig(name="gpt-docs", namespace=NS, storage_uri="gs://b/m/hf", gpus=1, min_replicas=0)
    assert admit(inference_service(dc), schema("InferenceService")) == []


@pytest.mark.parametrize("change, field, message", [
    (lambda j: j["metadata"].update(name="9gpt"), "<nil>", "metadata.name must match RFC 1035 DNS label format"),
    (lambda j: j["spec"].update(managedBy="example.com/mine"), "spec.managedBy",
     "ManagedBy must be trainer.kubeflow.org/trainjob-controller or kueue.x-k8s.io/multikueue if set"),
    (lambda j: j["spec"].update(initializer={"model": {"storageUri": "models/gpt"}}),
     "spec.initializer.model.storageUri",
     "storageUri may be empty, or it must be a valid URI (scheme://...)"),
])
def test_trainjob_crd_rules_refuse_with_their_message(change, field, message):
    bad = job()
    change(bad)
    e = refused(bad, schema("TrainJob"))
    assert e.code == 422 and [(c.field, c.detail) for c in e.causes] == [(field, message)]
    assert f'{field}: Invalid value: "' in str(e) and "(rule: self" in str(e)


def test_transition_rules_run_on_update_only():
    s, old = schema("TrainJob"), job()
    new = copy.deepcopy(old)
    new["spec"]["runtimeRef"]["name"] = "torch-other"
    new["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"][
        "spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = []
    assert cel.evaluate(s, new) == []                       # create: oldSelf rules do not run
    got = {(f.path, f.message) for f in cel.evaluate(s, new, old)}
    assert got == {("spec.runtimeRef", "field is immutable"),
                   (("spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec."
                     "template.spec.containers"), "field is immutable")}  # list-map items matched by their keys
    pj = job("pytorchjob")
    pj["spec"]["runPolicy"]["schedulingPolicy"] = {"queue": "a"}
    moved = copy.deepcopy(pj)
    moved["spec"]["runPolicy"]["schedulingPolicy"]["queue"] = "b"
    assert [f.message for f in cel.evaluate(schema("PyTorchJob"), moved, pj)] == [
        "spec.runPolicy.schedulingPolicy.queue is immutable"]


# ------------------------------------------------------------------ webhooks and children's names


@pytest.mark.parametrize("backend, change, message", [
    ("trainjob", lambda j: j["spec"]["trainer"]["env"].insert(0, {"name": "PET_NNODES", "value": "2"}),
     "spec.trainer.env: Invalid value: .*must not have reserved envs, invalid envs configured: \\[PET_NNODES\\]"),
    ("trainjob", lambda j: j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0].update(
        env=[{"name": "A", "value": "1"}]),
     "must not have envs for the dataset-initializer, model-initializer, node containers"),
    ("trainjob", lambda j: j["spec"]["runtimePatches"][0].update(manager="launcher"),
     'spec.runtimePatches.manager: Invalid value: "launcher": must be a domain-prefixed path'),
    ("pytorchjob", lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas=0),
     r"spec.pytorchReplicaSpecs\[Worker\].replicas: Forbidden: must be at least 1"),
])
def test_operator_webhooks_deny_as_they_word_it(backend, change, message):
    bad = job(backend)
    change(bad)
    e = refused(bad)
    assert e.code == 403 and e.status()["reason"] == "Forbidden"
    assert str(e).startswith("admission webhook \"validator.") and re.search(message, str(e))


def test_a_name_whose_pods_would_not_fit_is_refused_naming_the_pod():
    ClusterJobConfig(name="a" * 47, nodes=16)                      # a-..-node-0-15-abcde: 63 characters
    with pytest.raises(AdmissionError, match=r'its longest pod name would be "a{48}-node-0-15-abcde" \(64 characters\)'
                                             r".*at most 47 characters fits"):
        ClusterJobConfig(name="a" * 48, nodes=16)
    with pytest.raises(ConfigError, match=r'"p{55}-worker-10" \(65 characters\): the Training Operator cannot create'):
        ClusterJobConfig(name="p" * 55, nodes=12, backend="pytorchjob")
    big = job()
    big["metadata"]["name"] = "b" * 50                            # built by hand: build_job checks it too
    assert refused(big).code == 0 and "b" * 50 + "-node-0-1-abcde" in str(refused(big))


def test_deploy_names_follow_kserve():
    with pytest.raises(ConfigError, match=r"admission webhook \"inferenceservice.kserve-webhook-server.validator\" "
                                          r"denied the request: the InferenceService \"9gpt\" is invalid"):
        DeployConfig(name="9gpt")
    DeployConfig(name="a" * 44, namespace="kubeflow")             # a-..-predictor-kubeflow: 63 characters
    with pytest.raises(ConfigError, match=r'host name would be "a{45}-predictor-kubeflow" \(64 characters\)'):
        DeployConfig(name="a" * 45, namespace="kubeflow")
    with pytest.raises(ConfigError, match="'MinReplicas' cannot be greater than MaxReplicas"):
        obj = inference_service(DeployConfig(name="gpt", storage_uri="gs://b/m"))
        obj["spec"]["predictor"].update(minReplicas=3, maxReplicas=2)
        admit(obj)


# ------------------------------------------------------------------ `mtnlg job`


@pytest.mark.parametrize("backend, extra, says", [
    ("trainjob", [], ('metadata.name: Invalid value: "9gpt": metadata.name must match RFC 1035 DNS label format '
                      "(rule: self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$'))")),
    ("pytorchjob", [], 'metadata.name: Invalid value: "9gpt": should match: a DNS-1035 label must consist'),
    ("trainjob", ["--schema-dir", str(SCHEMAS)], 'is invalid: metadata.name: Invalid value: "9gpt"'),
])
def test_mtnlg_job_refuses_a_name_the_cluster_refuses(tmp_path, capsys, backend, extra, says):
    from mtnlg.cli import main

    out = tmp_path / "job.yaml"
    assert main(["job", "--backend", backend, "--name", "9gpt", "--nodes", "2", "--recipe", "debug",
                 "data.path=gs://b/t", "output=gs://b/r", "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and says in err
    assert not out.exists()


# ------------------------------------------------------------------ the API emulator


def test_the_emulator_answers_as_the_api_server(tmp_path):
    schema("TrainJob")
    with KubeEmulator() as kube:
        custom = kubernetes.client.CustomObjectsApi(kube.api_client)

        def create(res, body, **kw):
            with pytest.raises(ApiException) as e:
                custom.create_namespaced_custom_object(res.group, res.version, NS, res.plural, body, **kw)
            return e.value.status, json.loads(e.value.body)

        bad = job()
        bad["metadata"]["name"] = "9gpt"
        rule = "metadata.name must match RFC 1035 DNS label format"
        assert create(TRAINJOBS, bad) == (422, {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f'TrainJob.trainer.kubeflow.org "9gpt" is invalid: <nil>: Invalid value: "object": {rule}',
            "reason": "Invalid", "details": {"name": "9gpt", "group": "trainer.kubeflow.org", "kind": "TrainJob",
                                             "causes": [{"reason": "FieldValueInvalid",
                                                         "message": f'Invalid value: "object": {rule}',
                                                         "field": "<nil>"}]},
            "code": 422})
        typo = job()
        typo["spec"]["trainer"]["numNodes"] = "two"                    # a type error: the CEL rules wait
        code, body = create(TRAINJOBS, typo)
        assert code == 422 and [c["field"] for c in body["details"]["causes"]] == ["spec.trainer.numNodes", "<nil>"]
        assert "some validation rules were not checked" in body["message"]
        pj = job("pytorchjob")
        pj["metadata"]["name"] = "9gpt"
        code, body = create(PYTORCHJOBS, pj)
        assert code == 403 and body["message"].startswith(
            'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request: '
            'metadata.name: Invalid value: "9gpt": should match: a DNS-1035 label')
        extra = job(name="extra")
        extra["spec"]["trainer"]["numProcsPerNode"] = 8
        code, body = create(TRAINJOBS, copy.deepcopy(extra), field_validation="Strict")
        assert (code, body["reason"]) == (400, "BadRequest") and body["message"].endswith(
            'strict decoding error: unknown field "spec.trainer.numProcsPerNode"')
        made = custom.create_namespaced_custom_object(*TRAINJOBS[:2], NS, TRAINJOBS.plural, extra)
        assert "numProcsPerNode" not in made["spec"]["trainer"]           # pruned, as the API server does
        # an update (replace or patch) runs the transition rules against the stored object
        moved = dict(made, spec={**made["spec"], "trainer": {**made["spec"]["trainer"], "numNodes": 4}})
        for update in (lambda: custom.replace_namespaced_custom_object(*TRAINJOBS[:2], NS, TRAINJOBS.plural,
                                                                         "extra", moved),
                       lambda: custom.patch_namespaced_custom_object(*TRAINJOBS[:2], NS, TRAINJOBS.plural, "extra",
                                                                       {"spec": {"trainer": {"numNodes": 4}}})):
            with pytest.raises(ApiException) as e:
                update()
            assert e.value.status == 422 and json.loads(e.value.body)["details"]["causes"] == [
                {"reason": "FieldValueInvalid", "message": 'Invalid value: "object": field is immutable',
                 "field": "spec.trainer"}]
        relabelled = custom.patch_namespaced_custom_object(*TRAINJOBS[:2], NS, TRAINJOBS.plural, "extra",
                                                           {"metadata": {"labels": {"team": "a"}}})
        assert relabelled["metadata"]["labels"]["team"] == "a"            # the spec did not change: admitted
        isvc = inference_service(DeployConfig(name="gpt", namespace=NS, storage_uri="gs://b/m"))
        isvc["metadata"]["name"] = "GPT"
        code, body = create(INFERENCESERVICES, isvc)
        assert code == 422 and "a lowercase RFC 1123 subdomain" in body["message"]
        assert kube.list_objects(*TRAINJOBS, NS)[0]["metadata"]["name"] == "extra"  # nothing else was stored
        assert kube.server_errors == []
