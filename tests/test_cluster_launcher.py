"""The job launcher with the real ``kubernetes`` client against the in-process API emulator
(tests/kube_emulator/), for both backends; a test-side operator plays the Training
Operator / Kubeflow Trainer: it creates the job's pods, writes their logs and events, and
sets the job's conditions.

What the emulator does not check (so neither do these tests): RBAC, admission webhooks
(the webhook rules are checked in test_cluster_jobs.py instead), scheduling, and the real
operators' timing and condition sequences beyond the condition types they document."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading

import pytest
from kube_emulator import PYTORCHJOBS, TRAINJOBS, KubeEmulator

from mtnlg.cluster.jobs import JOB_LABEL, KINDS, QUEUE_LABEL, ClusterJobConfig, build_job
from mtnlg.cluster.launcher import JobDeleted, JobFailed, JobLauncher, JobTimeout, job_state, suspended
from mtnlg.config import ConfigError, load_config
from mtnlg.train.config import TrainRunConfig, recipe

pytestmark = pytest.mark.unit

NS = "team-a"
RESOURCES = {"trainjob": TRAINJOBS, "pytorchjob": PYTORCHJOBS}
DONE = {"trainjob": "Complete", "pytorchjob": "Succeeded"}  # each operator's success condition


@pytest.fixture
def kube():
    with KubeEmulator() as emulator:
        yield emulator
        assert emulator.server_errors == []


@pytest.fixture
def logs():
    """Records of the launcher's logger (mtnlg's loggers do not propagate to pytest's)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mtnlg.cluster")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lambda: "\n".join(r.getMessage() for r in records)
    logger.removeHandler(handler)
    logger.setLevel(level)


def make_job(backend: str, name: str = "gpt", **kw) -> dict:
    cfg = load_config(TrainRunConfig, None, ["data.path=gs://b/tokens", "output=gs://b/run",
                                             "train.micro_batch_size=1"], base=recipe("debug"))
    return build_job(ClusterJobConfig(name=name, namespace=NS, backend=backend, nodes=2, gpus_per_node=1, **kw), cfg)


def launcher(kube, backend: str) -> JobLauncher:
    return JobLauncher(backend, kube.custom_objects, kube.core_v1, poll_s=0.05)


def node_pods(backend: str, name: str) -> list[tuple[str, dict]]:
    """The pods each operator creates for a 2-node job, with its labels."""
    k = KINDS[backend]
    key, value = k.node0_label
    if backend == "trainjob":
        names = [f"{name}-node-0-0-abcde", f"{name}-node-0-1-fghij"]
        others = ["0", "1"]
    else:
        names = [f"{name}-master-0", f"{name}-worker-0"]
        others = ["master", "worker"]
    return [(n, {JOB_LABEL: name, k.pod_job_label: name, key: v}) for n, v in zip(names, others)]


def operator(kube, backend: str, script):
    """On a new job: create its pods and run ``script(job_name, pods)``."""
    res = RESOURCES[backend]

    def on_added(event, job):
        name = job["metadata"]["name"]
        pods = node_pods(backend, name)
        for pod, labels in pods:
            kube.create_pod(NS, pod, labels=labels, phase="Pending", owner=job,
                            containers=(KINDS[backend].container, "sidecar"))
        kube.set_condition(*res, NS, name, "Created")
        script(name, [p for p, _ in pods])

    kube.on(*res, on_added)


def later(seconds: float, fn) -> None:
    threading.Timer(seconds, fn).start()


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_success_streams_node0_log_and_cleans_up(kube, logs, backend):
    res = RESOURCES[backend]

    def script(name, pods):
        for p in pods:
            kube.set_pod_phase(NS, p, "Running")
        kube.set_pod_log(NS, pods[0], "step 1/4 | loss 8.30\n", finished=False)
        kube.set_pod_log(NS, pods[1], "worker line that is not streamed\n")
        kube.set_condition(*res, NS, name, "Running")

        def finish():
            kube.append_pod_log(NS, pods[0], "step 4/4 | loss 5.10\n")
            kube.finish_pod_log(NS, pods[0])
            kube.set_condition(*res, NS, name, DONE[backend], reason="JobSucceeded")
        later(0.6, finish)

    operator(kube, backend, script)
    out = launcher(kube, backend).run(make_job(backend), timeout_s=20)
    assert (out.state, out.adopted) == ("Succeeded", False)
    assert kube.get_object(*res, NS, "gpt") is None                     # cleanup=on-success
    kube.wait_for(lambda: "loss 5.10" in logs(), timeout=5)
    text = logs()
    assert "step 1/4 | loss 8.30" in text and "worker line" not in text
    assert "Running" in text and "Succeeded" in text


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_failure_names_reason_exit_code_last_lines_and_events(kube, backend):
    res = RESOURCES[backend]

    def script(name, pods):
        kube.set_pod_phase(NS, pods[1], "Running")
        kube.set_pod_log(NS, pods[0], "".join(f"step {i}\n" for i in range(100)) +
                         "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
        kube.set_pod_phase(NS, pods[0], "Failed", exit_code=137, reason="OOMKilled")
        kube.create_event(NS, pods[0], reason="BackOff", message="Back-off restarting failed container",
                          type="Warning")
        kube.set_condition(*res, NS, name, "Failed", reason="OOMKilled",
                           message=f"pod {pods[0]} exited with code 137")

    operator(kube, backend, script)
    with pytest.raises(JobFailed) as e:
        launcher(kube, backend).run(make_job(backend), timeout_s=20)
    msg = str(e.value)
    pod = node_pods(backend, "gpt")[0][0]
    assert f"failed: OOMKilled: pod {pod} exited with code 137" in msg
    assert "exit code 137 (OOMKilled)" in msg
    assert "CUDA out of memory" in msg and "step 99" in msg and "step 10\n" not in msg  # the last lines only
    assert "BackOff: Back-off restarting failed container" in msg
    assert kube.get_object(*res, NS, "gpt") is not None                 # failed jobs stay for inspection


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_unschedulable_pods_show_their_events_then_the_job_runs(kube, logs, backend):
    res = RESOURCES[backend]

    def script(name, pods):
        kube.create_event(NS, pods[0], reason="FailedScheduling", type="Warning",
                          message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")

        def scheduled():
            for p in pods:
                kube.set_pod_phase(NS, p, "Succeeded")
            kube.set_condition(*res, NS, name, DONE[backend])
        later(2.5, scheduled)  # the launcher looks at pending pods at least once a second here

    operator(kube, backend, script)
    out = launcher(kube, backend).run(make_job(backend), timeout_s=20)
    assert out.state == "Succeeded"
    text = logs()
    assert "pending: FailedScheduling: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu." in text
    assert text.count("Insufficient nvidia.com/gpu") == 1                # each event once


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_timeout_deletes_the_job(kube, backend):
    res = RESOURCES[backend]
    operator(kube, backend, lambda name, pods: kube.set_condition(*res, NS, name, "Running"))
    with pytest.raises(JobTimeout, match=r"still (Running|Created|Pending) after"):
        launcher(kube, backend).run(make_job(backend), timeout_s=1.5)
    assert kube.get_object(*res, NS, "gpt") is None


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_a_retried_step_adopts_its_job(kube, logs, backend):
    res = RESOURCES[backend]
    job = make_job(backend)
    kube.create_object(*res, NS, job)                          # the first attempt's job, still running
    kube.set_condition(*res, NS, "gpt", "Running")
    later(0.8, lambda: kube.set_condition(*res, NS, "gpt", DONE[backend]))
    out = launcher(kube, backend).run(job, timeout_s=20)
    assert out.adopted and out.state == "Succeeded"
    assert "exists (a retried step): adopting it" in logs()
    assert len(kube.list_objects(*res, NS)) == 0               # one job all along, cleaned up at the end


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_a_foreign_object_of_the_same_name_is_not_adopted(kube, backend):
    res = RESOURCES[backend]
    foreign = make_job(backend)
    foreign["metadata"]["labels"] = {"team": "other"}
    kube.create_object(*res, NS, foreign)
    with pytest.raises(ConfigError, match="exists and was not created by mtnlg"):
        launcher(kube, backend).run(make_job(backend), timeout_s=5)
    assert kube.get_object(*res, NS, "gpt")["metadata"]["labels"] == {"team": "other"}  # left alone


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_the_job_deleted_mid_wait_is_a_clear_error(kube, backend):
    res = RESOURCES[backend]

    def script(name, pods):
        kube.set_condition(*res, NS, name, "Running")
        later(0.5, lambda: kube.delete_object(*res, NS, name))

    operator(kube, backend, script)
    with pytest.raises(JobDeleted, match="was deleted while the launcher waited for it"):
        launcher(kube, backend).run(make_job(backend), timeout_s=20)


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_sigterm_to_the_launcher_deletes_the_job(kube, logs, backend):
    res = RESOURCES[backend]

    def script(name, pods):
        kube.set_condition(*res, NS, name, "Running")
        later(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))

    operator(kube, backend, script)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        launcher(kube, backend).run(make_job(backend), timeout_s=20)
    assert e.value.code == 143
    assert kube.get_object(*res, NS, "gpt") is None
    assert "received SIGTERM: deleting" in logs()
    assert signal.getsignal(signal.SIGTERM) is before          # the handler is restored


def test_job_state_reads_both_operators_conditions():
    def obj(*conds):
        return {"status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                          for t, s, r, m in conds]}}

    assert job_state({}) == ("Pending", "", "")
    assert job_state(obj(("Created", "True", "", ""), ("Running", "True", "", "")))[0] == "Running"
    assert job_state(obj(("Running", "False", "", ""), ("Complete", "True", "Done", "ok"))) == \
        ("Succeeded", "Done", "ok")
    assert job_state(obj(("Running", "True", "", ""), ("Failed", "True", "DeadlineExceeded", "late"))) == \
        ("Failed", "DeadlineExceeded", "late")
    # held by Kueue: the spec says so before the operator does, and is resumed before it says so
    assert job_state({"spec": {"suspend": True}}) == ("Suspended", "", "")
    assert job_state({"spec": {"runPolicy": {"suspend": True}}, **obj(("Created", "True", "", ""))})[0] == "Suspended"
    held = obj(("Created", "True", "", ""), ("Suspended", "True", "JobSuspended", "PyTorchJob gpt is suspended."))
    assert job_state(held) == ("Suspended", "JobSuspended", "PyTorchJob gpt is suspended.")
    assert job_state({**held, "spec": {"runPolicy": {"suspend": False}}})[0] == "Resuming"
    resumed = obj(("Created", "True", "", ""), ("Suspended", "False", "JobResumed", ""), ("Running", "True", "", ""))
    assert job_state({**resumed, "spec": {"runPolicy": {"suspend": False}}})[0] == "Running"


def test_the_job_is_owned_by_the_launchers_pod_and_goes_with_it(kube, tmp_path, monkeypatch):
    import mtnlg.cluster.incluster as launcher_mod
    from mtnlg.cluster.jobs import with_owner

    ns_file = tmp_path / "namespace"
    ns_file.write_text(NS)
    monkeypatch.setattr(launcher_mod, "SERVICE_ACCOUNT_NAMESPACE", str(ns_file))
    monkeypatch.setenv("HOSTNAME", "mtnlg-gpt-train-launcher")
    assert launcher_mod.pod_namespace() == NS
    kube.create_pod(NS, "mtnlg-gpt-train-launcher", phase="Running")
    owner = launcher_mod.pod_owner(core=kube.core_v1)
    pod = kube.get_object("", "v1", "pods", NS, "mtnlg-gpt-train-launcher")
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "mtnlg-gpt-train-launcher",
                     "uid": pod["metadata"]["uid"]}
    job = with_owner(make_job("trainjob"), owner)
    assert launcher(kube, "trainjob").create_or_adopt(job) is False
    assert kube.get_object(*TRAINJOBS, NS, "gpt")["metadata"]["ownerReferences"][0]["uid"] == pod["metadata"]["uid"]
    kube.delete_object("", "v1", "pods", NS, "mtnlg-gpt-train-launcher")   # the pipeline run's pods go ...
    kube.wait_for(lambda: kube.get_object(*TRAINJOBS, NS, "gpt") is None)  # ... and the job with them
    monkeypatch.delenv("HOSTNAME")
    assert launcher_mod.pod_owner(core=kube.core_v1) is None              # outside a pod: no owner


def test_on_kubeflow_pipelines_the_job_is_owned_by_the_runs_workflow(kube, tmp_path, monkeypatch):
    """A KFP step's pod belongs to the run's Argo Workflow: the job is owned by the Workflow,
    so a retry (a new pod of the same Workflow) adopts a job whose owner still exists, and
    deleting the run removes the job."""
    import mtnlg.cluster.incluster as launcher_mod
    from mtnlg.cluster.jobs import with_owner

    ns_file = tmp_path / "namespace"
    ns_file.write_text(NS)
    monkeypatch.setattr(launcher_mod, "SERVICE_ACCOUNT_NAMESPACE", str(ns_file))
    wf = kube.create_object("argoproj.io", "v1alpha1", "workflows", NS, {
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "mtnlg-gpt-x7k2p"}})
    owners = []
    for attempt in ("mtnlg-gpt-x7k2p-train-1", "mtnlg-gpt-x7k2p-train-2"):  # the step and its retry
        kube.create_pod(NS, attempt, phase="Running", owner=wf)
        monkeypatch.setenv("HOSTNAME", attempt)
        owners.append(launcher_mod.pod_owner(core=kube.core_v1))
    assert owners[0] == owners[1] == {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                                      "name": "mtnlg-gpt-x7k2p", "uid": wf["metadata"]["uid"]}
    job = with_owner(make_job("trainjob"), owners[0])
    assert launcher(kube, "trainjob").create_or_adopt(job) is False      # the first attempt creates it
    kube.delete_object("", "v1", "pods", NS, "mtnlg-gpt-x7k2p-train-1")  # the failed attempt's pod goes
    assert launcher(kube, "trainjob").create_or_adopt(with_owner(make_job("trainjob"), owners[1])) is True
    assert kube.get_object(*TRAINJOBS, NS, "gpt") is not None             # adopted, still owned
    kube.delete_object("argoproj.io", "v1alpha1", "workflows", NS, "mtnlg-gpt-x7k2p")  # the run is deleted
    kube.wait_for(lambda: kube.get_object(*TRAINJOBS, NS, "gpt") is None)


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_a_retry_replaces_a_failed_job_of_its_own_instead_of_adopting_it(kube, logs, backend):
    res = RESOURCES[backend]
    job = make_job(backend)
    kube.create_object(*res, NS, job)                          # the first attempt's job, which failed
    kube.set_condition(*res, NS, "gpt", "Failed", reason="BackoffLimitExceeded")
    first_uid = kube.get_object(*res, NS, "gpt")["metadata"]["uid"]
    operator(kube, backend, lambda name, pods: later(0.3, lambda: kube.set_condition(*res, NS, name, DONE[backend])))
    out = launcher(kube, backend).run(job, timeout_s=20, cleanup="never")
    assert out.state == "Succeeded" and not out.adopted
    assert kube.get_object(*res, NS, "gpt")["metadata"]["uid"] != first_uid   # a new job
    assert "exists but failed: deleting it and creating it again" in logs()


def test_a_job_being_deleted_is_waited_out_and_created_again(kube, logs):
    res = RESOURCES["trainjob"]
    job = make_job("trainjob")
    kube.create_object(*res, NS, dict(job, metadata={**job["metadata"], "finalizers": ["test/hold"]}))
    kube.delete_object(*res, NS, "gpt")                        # held by the finalizer: terminating
    assert kube.get_object(*res, NS, "gpt")["metadata"].get("deletionTimestamp")
    later(0.5, lambda: kube.patch_object(*res, NS, "gpt", {"metadata": {"finalizers": None}}))
    operator(kube, "trainjob", lambda name, pods: kube.set_condition(*res, NS, name, DONE["trainjob"]))
    out = launcher(kube, "trainjob").run(job, timeout_s=20)
    assert out.state == "Succeeded" and not out.adopted
    assert "is being deleted: deleting it and creating it again" in logs()


def test_transient_api_trouble_is_retried_not_fatal(kube, logs, monkeypatch):
    import urllib3

    res = RESOURCES["trainjob"]
    operator(kube, "trainjob", lambda name, pods: later(0.5, lambda: kube.set_condition(*res, NS, name,
                                                                                       DONE["trainjob"])))
    lau = launcher(kube, "trainjob")
    real_get, calls = lau._get, {"n": 0}

    def flaky_get(name, ns):
        calls["n"] += 1
        if calls["n"] == 2:
            raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
        return real_get(name, ns)

    monkeypatch.setattr(lau, "_get", flaky_get)
    assert lau.run(make_job("trainjob"), timeout_s=20).state == "Succeeded"
    assert "Kubernetes API trouble while following TrainJob" in logs() and calls["n"] >= 3


# Each operator's reasons on its Suspended condition (Trainer v2; the Training Operator)
SUSPEND_REASONS = {"trainjob": ("Suspended", "Resumed"), "pytorchjob": ("JobSuspended", "JobResumed")}


def kueue(kube, backend: str, admit_after: float, on_running) -> None:
    """A test-side Kueue with the operator under it. Kueue's mutating webhook suspends a job
    that names a queue as it is created; the operator reports it Suspended and makes no pods;
    ``admit_after`` seconds later Kueue admits it (unsuspends it); the operator resumes it,
    creates its pods and calls ``on_running(name, pods)``."""
    res = RESOURCES[backend]
    stopped, resumed = SUSPEND_REASONS[backend]

    def webhook(obj, old):
        if old is None and QUEUE_LABEL in (obj["metadata"].get("labels") or {}):
            holder = obj["spec"] if backend == "trainjob" else obj["spec"].setdefault("runPolicy", {})
            holder["suspend"] = True

    def admit(name):
        kube.patch_object(*res, NS, name, {"spec": {"suspend": False}} if backend == "trainjob" else
                          {"spec": {"runPolicy": {"suspend": False}}})

    def react(event, job):
        name = job["metadata"]["name"]
        if event == "ADDED" and suspended(job):
            kube.set_condition(*res, NS, name, "Suspended", reason=stopped, message=f"{name} is suspended")
            later(admit_after, lambda: admit(name))
        elif event == "MODIFIED" and job_state(job)[0] == "Resuming":
            kube.set_condition(*res, NS, name, "Suspended", "False", reason=resumed, message=f"{name} is resumed")
            pods = node_pods(backend, name)
            for pod, labels in pods:
                kube.create_pod(NS, pod, labels=labels, phase="Running", owner=job,
                                containers=(KINDS[backend].container,))
            on_running(name, [p for p, _ in pods])

    kube.mutate(*res, webhook)
    kube.on(*res, react, events=("ADDED", "MODIFIED"))


@pytest.mark.parametrize("backend, queued, timeout", [("trainjob", 1.6, 1.2), ("pytorchjob", 0.5, None)])
def test_a_job_kueue_holds_in_its_queue_is_watched_until_admitted(kube, logs, backend, queued, timeout):
    """Suspended in its queue is waiting, not failing; the launcher timeout (1.2 s, shorter
    than the 1.6 s in the queue) bounds the time the job runs, not the time it waits."""
    res = RESOURCES[backend]

    def run(name, pods):  # the nodes train briefly and finish
        for p in pods:
            kube.set_pod_phase(NS, p, "Succeeded")
        kube.set_condition(*res, NS, name, DONE[backend])

    kueue(kube, backend, queued, lambda name, pods: later(0.3, lambda: run(name, pods)))
    out = launcher(kube, backend).run(make_job(backend, queue_name="gpu-queue"), timeout_s=timeout, cleanup="never")
    assert (out.state, out.adopted) == ("Succeeded", False)
    assert queued - 0.3 <= out.queued_s <= out.seconds
    kind = KINDS[backend].kind
    text = logs()
    assert re.search(rf"{kind} {NS}/gpt: Suspended( \({SUSPEND_REASONS[backend][0]}\))?: waits in queue gpu-queue "
                     r"until Kueue admits it \(its ClusterQueue has quota for it\); the launcher timeout does not run "
                     "meanwhile", text)                                 # the reason once the operator has said it
    assert f"{kind} {NS}/gpt left its queue after" in text and "Succeeded" in text
    stored = kube.get_object(*res, NS, "gpt")
    assert suspended(stored) is False                                   # created suspended, admitted since
    assert stored["metadata"]["labels"][QUEUE_LABEL] == "gpu-queue"
