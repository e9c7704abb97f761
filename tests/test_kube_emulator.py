"""The in-process Kubernetes API emulator (tests/kube_emulator/), driven by the real client."""

from __future__ import annotations

import json
import threading
import time

import kubernetes
import pytest
from kube_emulator import PODS, PYTORCHJOBS, TRAINJOBS, KubeEmulator, KubeError, match_fields, match_labels
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.unit

NS = "team-a"


@pytest.fixture
def kube():
    with KubeEmulator() as emulator:
        yield emulator
        assert emulator.server_errors == []  # no 500s: every request was understood


@pytest.fixture
def custom(kube):
    return kubernetes.client.CustomObjectsApi(kube.api_client)


@pytest.fixture
def core(kube):
    return kubernetes.client.CoreV1Api(kube.api_client)


def pytorchjob(name: str, **labels: str) -> dict:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {"spec": {"containers": [
                {"name": "pytorch", "image": "trainer:1"}]}}}}}}


def trainjob(name: str) -> dict:
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}}}


def create(custom, res, body):
    return custom.create_namespaced_custom_object(res.group, res.version, NS, res.plural, body)


def get(custom, res, name):
    return custom.get_namespaced_custom_object(res.group, res.version, NS, res.plural, name)


def status_of(excinfo) -> tuple[int, dict]:
    return excinfo.value.status, json.loads(excinfo.value.body)


# ------------------------------------------------------------------------------ custom objects
def test_create_get_list_stamps_metadata(kube, custom):
    made = create(custom, PYTORCHJOBS, pytorchjob("pj-1", team="a"))
    made_tj = create(custom, TRAINJOBS, trainjob("tj-1"))
    md = made["metadata"]
    assert md["uid"] and md["uid"] != made_tj["metadata"]["uid"]
    assert int(made_tj["metadata"]["resourceVersion"]) > int(md["resourceVersion"]) > 0
    assert md["creationTimestamp"].endswith("Z") and md["namespace"] == NS and md["generation"] == 1

    got = get(custom, PYTORCHJOBS, "pj-1")
    assert got["metadata"]["uid"] == md["uid"]
    assert got["spec"] == pytorchjob("pj-1")["spec"]
    assert get(custom, TRAINJOBS, "tj-1")["spec"]["trainer"] == {"numNodes": 2}

    listed = custom.list_namespaced_custom_object(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural)
    assert [o["metadata"]["name"] for o in listed["items"]] == ["pj-1"]
    assert int(listed["metadata"]["resourceVersion"]) >= int(made_tj["metadata"]["resourceVersion"])
    assert custom.list_namespaced_custom_object(*PYTORCHJOBS[:2], "elsewhere", PYTORCHJOBS.plural)["items"] == []
    # Label selectors are honoured by the server.
    create(custom, PYTORCHJOBS, pytorchjob("pj-2", team="b"))
    sel = custom.list_namespaced_custom_object(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural, label_selector="team=b")
    assert [o["metadata"]["name"] for o in sel["items"]] == ["pj-2"]
    # The direct (controller-side) view is the same state.
    assert kube.get_object(*PYTORCHJOBS, NS, "pj-1")["metadata"]["uid"] == md["uid"]
    assert {o["metadata"]["name"] for o in kube.list_objects(*PYTORCHJOBS, NS)} == {"pj-1", "pj-2"}
    assert kube.get_object(*PYTORCHJOBS, NS, "nope") is None
    # A resource nobody declared or created is a 404, as a missing CRD is.
    with pytest.raises(ApiException) as e:
        custom.list_namespaced_custom_object("example.com", "v1", NS, "widgets")
    assert e.value.status == 404


def test_duplicate_create_is_409_and_missing_is_404(kube, custom):
    first = create(custom, PYTORCHJOBS, pytorchjob("dup"))
    with pytest.raises(ApiException) as e:
        create(custom, PYTORCHJOBS, pytorchjob("dup"))
    status, body = status_of(e)
    assert status == 409 and body["reason"] == "AlreadyExists" and body["details"]["name"] == "dup"
    assert get(custom, PYTORCHJOBS, "dup")["metadata"]["uid"] == first["metadata"]["uid"]  # untouched
    with pytest.raises(KubeError) as ke:  # the direct method refuses it too
        kube.create_object(*PYTORCHJOBS, NS, pytorchjob("dup"))
    assert ke.value.status == 409

    for call in (lambda: get(custom, TRAINJOBS, "ghost"),
                 lambda: custom.delete_namespaced_custom_object(*TRAINJOBS[:2], NS, TRAINJOBS.plural, "ghost"),
                 lambda: custom.patch_namespaced_custom_object(*TRAINJOBS[:2], NS, TRAINJOBS.plural, "ghost", {})):
        with pytest.raises(ApiException) as e:
            call()
        status, body = status_of(e)
        assert status == 404 and body["reason"] == "NotFound"


def test_delete_then_404_and_recreate(kube, custom):
    old = create(custom, TRAINJOBS, trainjob("tj"))
    custom.delete_namespaced_custom_object(*TRAINJOBS[:2], NS, TRAINJOBS.plural, "tj")
    with pytest.raises(ApiException) as e:
        get(custom, TRAINJOBS, "tj")
    assert e.value.status == 404
    assert custom.list_namespaced_custom_object(*TRAINJOBS[:2], NS, TRAINJOBS.plural)["items"] == []
    new = create(custom, TRAINJOBS, trainjob("tj"))  # the name is free again
    assert new["metadata"]["uid"] != old["metadata"]["uid"]


def test_patch_status_and_replace(kube, custom):
    made = create(custom, PYTORCHJOBS, pytorchjob("pj"))
    rv0 = int(made["metadata"]["resourceVersion"])
    after = custom.patch_namespaced_custom_object_status(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural, "pj",
                                                         {"status": {"startTime": "2024-01-01T00:00:00Z"},
                                                          "spec": {"ignored": True}})
    assert after["status"] == {"startTime": "2024-01-01T00:00:00Z"}
    assert "ignored" not in after["spec"]  # the status subresource changes .status only
    assert int(after["metadata"]["resourceVersion"]) > rv0 and after["metadata"]["generation"] == 1
    patched = custom.patch_namespaced_custom_object(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural, "pj",
                                                    {"metadata": {"labels": {"x": "1"}}, "spec": {"runPolicy": {}}})
    assert patched["metadata"]["labels"] == {"x": "1"} and patched["metadata"]["generation"] == 2
    assert patched["metadata"]["uid"] == made["metadata"]["uid"]
    # PUT with a stale resourceVersion is the optimistic-concurrency 409; with the current one it works.
    stale = dict(made, spec={"replaced": True})
    with pytest.raises(ApiException) as e:
        custom.replace_namespaced_custom_object(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural, "pj", stale)
    assert status_of(e)[0] == 409 and status_of(e)[1]["reason"] == "Conflict"
    fresh = dict(patched, spec={**patched["spec"], "nprocPerNode": "2"})  # admitted: a valid PyTorchJob
    assert custom.replace_namespaced_custom_object(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural, "pj",
                                                   fresh)["spec"] == fresh["spec"]


# ------------------------------------------------------------------------------ watches
def test_watch_sees_added_then_modified_from_the_controller(kube, custom):
    create(custom, PYTORCHJOBS, pytorchjob("other"))
    create(custom, PYTORCHJOBS, pytorchjob("pj"))
    seen = []
    start = time.monotonic()
    w = kubernetes.watch.Watch()
    for ev in w.stream(custom.list_namespaced_custom_object, *PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural,
                       field_selector="metadata.name=pj", timeout_seconds=5, _request_timeout=10):
        seen.append((ev["type"], ev["object"]["metadata"]["name"]))
        conds = {c["type"]: c for c in (ev["object"].get("status") or {}).get("conditions") or []}
        true = {t for t, c in conds.items() if c["status"] == "True"}
        if ev["type"] == "ADDED":  # the operator reacts: the job runs, then succeeds
            kube.set_condition(*PYTORCHJOBS, NS, "pj", "Running", reason="PyTorchJobRunning")
        elif true == {"Running"}:
            kube.set_condition(*PYTORCHJOBS, NS, "pj", "Running", "False")
            kube.set_condition(*PYTORCHJOBS, NS, "pj", "Succeeded", message="done")
        elif "Succeeded" in true:
            w.stop()
    assert seen == [("ADDED", "pj"), ("MODIFIED", "pj"), ("MODIFIED", "pj"), ("MODIFIED", "pj")]
    assert conds["Running"]["status"] == "False" and conds["Running"]["lastTransitionTime"]
    assert conds["Succeeded"]["status"] == "True" and conds["Succeeded"]["message"] == "done"
    assert time.monotonic() - start < 4  # ended by the events, not by the timeout
    # The client sent watch=True; the server must have read it as a watch, not as a list.
    watches = [r for r in kube.requests if r.params.get("watch")]
    assert watches and all(r.params["watch"] == "true" for r in watches)


def test_watch_timeout_resume_and_gone(kube, custom):
    create(custom, TRAINJOBS, trainjob("tj"))
    start = time.monotonic()
    w = kubernetes.watch.Watch()
    events = list(w.stream(custom.list_namespaced_custom_object, *TRAINJOBS[:2], NS, TRAINJOBS.plural,
                           timeout_seconds=1, _request_timeout=10))
    assert [e["type"] for e in events] == ["ADDED"]
    assert 0.9 < time.monotonic() - start < 3  # the server ended the quiet watch at timeoutSeconds
    rv = events[0]["object"]["metadata"]["resourceVersion"]
    kube.set_status(*TRAINJOBS, NS, "tj", jobsStatus=[{"name": "node", "active": 2}])
    kube.delete_object(*TRAINJOBS, NS, "tj")
    resumed = []
    w = kubernetes.watch.Watch()
    for ev in w.stream(custom.list_namespaced_custom_object, *TRAINJOBS[:2], NS, TRAINJOBS.plural,
                       resource_version=rv, timeout_seconds=5, _request_timeout=10):
        resumed.append(ev)
        if ev["type"] == "DELETED":
            w.stop()
    assert [e["type"] for e in resumed] == ["MODIFIED", "DELETED"]  # no replayed ADDED
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in resumed]
    assert versions == sorted(versions) and versions[0] > int(rv)
    kube.expire_watch_history()
    with pytest.raises(ApiException) as e:
        list(kubernetes.watch.Watch().stream(custom.list_namespaced_custom_object, *TRAINJOBS[:2], NS,
                                             TRAINJOBS.plural, resource_version=rv, timeout_seconds=1,
                                             _request_timeout=10))
    assert e.value.status == 410


# ------------------------------------------------------------------------------ pods, logs, events
def test_pods_with_labels_phase_and_logs(kube, core):
    job = kube.create_object(*PYTORCHJOBS, NS, pytorchjob("pj"))
    kube.create_pod(NS, "pj-master-0", labels={"training.kubeflow.org/job-name": "pj"}, phase="Running",
                    containers=["pytorch"], owner=job)
    kube.create_pod(NS, "unrelated", labels={"app": "x"})
    pods = core.list_namespaced_pod(NS, label_selector="training.kubeflow.org/job-name=pj").items
    assert [p.metadata.name for p in pods] == ["pj-master-0"]
    pod = pods[0]
    assert pod.status.phase == "Running" and pod.metadata.uid
    assert pod.metadata.owner_references[0].uid == job["metadata"]["uid"]
    assert pod.status.container_statuses[0].name == "pytorch"
    assert pod.status.container_statuses[0].state.running is not None
    assert core.read_namespaced_pod("unrelated", NS).status.phase == "Pending"

    kube.set_pod_log(NS, "pj-master-0", "step 1\nstep 2\nstep 3\n")
    assert core.read_namespaced_pod_log("pj-master-0", NS) == "step 1\nstep 2\nstep 3\n"
    assert core.read_namespaced_pod_log("pj-master-0", NS, tail_lines=2, container="pytorch") == "step 2\nstep 3\n"
    assert core.read_namespaced_pod_log("unrelated", NS) == ""
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod_log("ghost", NS)
    assert e.value.status == 404

    kube.set_pod_phase(NS, "pj-master-0", "Failed", exit_code=137, reason="OOMKilled")
    failed = core.read_namespaced_pod("pj-master-0", NS)
    assert failed.status.phase == "Failed"
    assert failed.status.container_statuses[0].state.terminated.exit_code == 137
    assert failed.status.container_statuses[0].state.terminated.reason == "OOMKilled"
    # Deleting the owner cascades to its pods.
    custom = kubernetes.client.CustomObjectsApi(kube.api_client)
    custom.delete_namespaced_custom_object(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural, "pj",
                                           body={"propagationPolicy": "Foreground"})
    assert [p.metadata.name for p in core.list_namespaced_pod(NS).items] == ["unrelated"]


def test_log_follow_streams_until_the_pod_ends(kube, core):
    kube.create_pod(NS, "p", phase="Running")
    kube.set_pod_log(NS, "p", "one\n", finished=False)
    resp = core.read_namespaced_pod_log("p", NS, follow=True, _preload_content=False, _request_timeout=10)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(resp.stream(4096)), daemon=True)
    reader.start()
    kube.wait_for(lambda: b"".join(got) == b"one\n", timeout=5)
    kube.append_pod_log(NS, "p", "two\n")
    kube.wait_for(lambda: b"".join(got) == b"one\ntwo\n", timeout=5)
    assert reader.is_alive()  # still following
    kube.set_pod_phase(NS, "p", "Succeeded")
    reader.join(5)
    assert not reader.is_alive() and b"".join(got) == b"one\ntwo\n"
    # With the default (preloaded) client call, follow returns the whole finished log.
    assert core.read_namespaced_pod_log("p", NS, follow=True, _request_timeout=10) == "one\ntwo\n"


def test_events_about_a_pod(kube, core):
    pod = kube.create_pod(NS, "pending-pod")
    kube.create_event(NS, "pending-pod", reason="FailedScheduling", type="Warning",
                      message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu")
    kube.create_event(NS, "another-pod", reason="Pulled", message="image pulled")
    events = core.list_namespaced_event(NS, field_selector="involvedObject.name=pending-pod").items
    assert [(e.reason, e.type) for e in events] == [("FailedScheduling", "Warning")]
    assert events[0].involved_object.uid == pod["metadata"]["uid"]
    assert events[0].involved_object.kind == "Pod" and "Insufficient" in events[0].message
    assert len(core.list_namespaced_event(NS).items) == 2


# ------------------------------------------------------------------------------ controller side
def test_reactor_plays_the_operator(kube, custom, core):
    def operator(kind, job):
        name = job["metadata"]["name"]
        kube.create_pod(NS, f"{name}-master-0", phase="Running", owner=job,
                        labels={"training.kubeflow.org/job-name": name})
        kube.set_condition(*PYTORCHJOBS, NS, name, "Running")

    kube.on(*PYTORCHJOBS, operator)
    made = create(custom, PYTORCHJOBS, pytorchjob("pj"))
    kube.wait_idle()
    pod = core.read_namespaced_pod("pj-master-0", NS)
    assert pod.metadata.owner_references[0].uid == made["metadata"]["uid"]
    assert get(custom, PYTORCHJOBS, "pj")["status"]["conditions"][0]["type"] == "Running"
    assert kube.controller_errors == []


def test_a_mutating_webhook_changes_what_clients_write_before_it_is_validated(kube, custom):
    seen = []

    def webhook(obj, old):  # e.g. Kueue: a job naming a queue is created suspended
        seen.append(old is None)
        if "kueue.x-k8s.io/queue-name" in (obj["metadata"].get("labels") or {}):
            obj["spec"].setdefault("runPolicy", {})["suspend"] = True

    kube.mutate(*PYTORCHJOBS, webhook)
    made = create(custom, PYTORCHJOBS, pytorchjob("queued", **{"kueue.x-k8s.io/queue-name": "q"}))
    assert made["spec"]["runPolicy"] == {"suspend": True}
    assert "runPolicy" not in create(custom, PYTORCHJOBS, pytorchjob("plain"))["spec"]
    custom.patch_namespaced_custom_object(PYTORCHJOBS.group, PYTORCHJOBS.version, NS, PYTORCHJOBS.plural, "plain",
                                          {"metadata": {"labels": {"x": "y"}}})
    kube.patch_object(*PYTORCHJOBS, NS, "queued", {"spec": {"runPolicy": {"suspend": False}}})  # the test's own
    assert get(custom, PYTORCHJOBS, "queued")["spec"]["runPolicy"] == {"suspend": False}      # not mutated
    assert seen == [True, True, False]


def test_generate_name_json_patch_and_delete_collection(kube, custom, core):
    made = core.create_namespaced_pod(NS, {"metadata": {"generateName": "worker-", "labels": {"role": "w"}},
                                           "spec": {"containers": [{"name": "c", "image": "i"}]}})
    name = made.metadata.name
    assert name.startswith("worker-") and len(name) > len("worker-") and made.status.phase == "Pending"
    core.patch_namespaced_pod(name, NS, [{"op": "add", "path": "/metadata/labels/extra", "value": "yes"},
                                         {"op": "replace", "path": "/spec/containers/0/image", "value": "j"}])
    pod = core.read_namespaced_pod(name, NS)
    assert pod.metadata.labels == {"role": "w", "extra": "yes"} and pod.spec.containers[0].image == "j"
    kube.create_pod(NS, "keeper", labels={"role": "keep"})
    core.delete_collection_namespaced_pod(NS, label_selector="role=w")
    assert [p.metadata.name for p in core.list_namespaced_pod(NS).items] == ["keeper"]


def test_finalizers_hold_deletion(kube, custom):
    body = pytorchjob("held")
    body["metadata"]["finalizers"] = ["example.com/cleanup"]
    create(custom, PYTORCHJOBS, body)
    custom.delete_namespaced_custom_object(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural, "held")
    assert get(custom, PYTORCHJOBS, "held")["metadata"]["deletionTimestamp"]  # still there
    custom.patch_namespaced_custom_object(*PYTORCHJOBS[:2], NS, PYTORCHJOBS.plural, "held",
                                          {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as e:
        get(custom, PYTORCHJOBS, "held")
    assert e.value.status == 404


def test_kubeconfig_and_selectors(kube, tmp_path):
    path = kube.write_kubeconfig(tmp_path / "kubeconfig")
    client = kubernetes.config.new_client_from_config(config_file=str(path))
    try:
        kube.create_pod(NS, "p", labels={"a": "1"})
        assert [p.metadata.name for p in kubernetes.client.CoreV1Api(client).list_namespaced_pod(NS).items] == ["p"]
    finally:
        client.close()
    assert match_labels({"a": "1", "b": "2"}, "a=1,b in (2,3),!c")
    assert not match_labels({"a": "1"}, "a!=1")
    assert not match_labels({}, "a")
    pod = {"metadata": {"name": "x"}, "status": {"phase": "Running"}}
    assert match_fields(pod, "metadata.name=x,status.phase!=Failed")
    assert not match_fields({"metadata": {"name": "x"}}, "metadata.name==y")
    assert kube.list_objects(*PODS, NS, label_selector="a notin (1)") == []
