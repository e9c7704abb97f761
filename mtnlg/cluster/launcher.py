"""Run a TrainJob or PyTorchJob to the end from a pipeline step (or ``mtnlg job --submit``).

:class:`ClusterJobLauncher` is the train step's launcher on a cluster: the same
:class:`mtnlg.train.launch.Launcher` interface as the local ``torchrun`` one (``launch(cfg)``
-> the run's summary), with the job built from a ``ClusterJobConfig`` and the run config.
:class:`JobLauncher` follows one job object to its end; what it does, in order:

1. **Create, or adopt.** The job's name is deterministic per pipeline run and task
   (``jobs.job_name``), so a retried step meets the job its first attempt created: a 409
   from the API server means *attach to it* (when its labels say it is ours), not fail.
   The trainer in the job resumes from its latest checkpoint either way.
2. **Watch** the job (a watch on its name, reconnected when the server closes it), log each
   phase change; look at its pods every ``poll_s``: a pod that stays Pending has its
   scheduling events logged (``0/4 nodes are available: 4 Insufficient nvidia.com/gpu``), and
   node 0's log is streamed into this process's log once it runs. A job that Kueue holds
   suspended (``spec.suspend`` / ``spec.runPolicy.suspend``, a ``Suspended`` condition) waits
   in its queue: logged, watched, never failed; it runs when Kueue admits it, and is
   suspended again if Kueue preempts it. Time in the queue does not count against
   ``timeout_s``, which bounds the time the job runs.
3. **Finish.** Succeeded: return. Failed: raise :class:`JobFailed` with the condition's
   reason and message, the failing pod's last log lines and its events. Deleted while
   waited on: :class:`JobDeleted`. Past ``timeout_s``: :class:`JobTimeout` (the job is
   deleted). SIGTERM to the launcher (the pipeline run was stopped) deletes the job.
4. **Clean up** by policy: ``on-success`` (default: failed jobs stay for inspection),
   ``on-failure``, ``always`` or ``never``.

The Kubernetes clients are the real ``kubernetes`` package's ``CustomObjectsApi`` and
``CoreV1Api`` (:mod:`mtnlg.cluster.client`: in-cluster config in a pod, else the kubeconfig),
and the job is followed by that module's watch loop; the launcher needs create,
get, list, watch, delete on its job kind, get/list on pods, get on pods/log and list on
events (manifests/overlays/*/role.yaml), nothing more.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from mtnlg import storage
from mtnlg.cluster.client import core_v1_api, custom_objects_api, status_of, transient, watch_until
from mtnlg.cluster.jobs import (JOB_LABEL, KINDS, QUEUE_LABEL, ClusterJobConfig, JobKind, build_job, reachable,
                               with_owner)
from mtnlg.config import ConfigError
from mtnlg.formats.runlog import read_summary
from mtnlg.progress import fmt_time, get_logger
from mtnlg.train.config import TrainRunConfig
from mtnlg.train.launch import Launcher

log = get_logger("mtnlg.cluster")

CLEANUP = ("on-success", "on-failure", "always", "never")
SUCCESS_CONDITIONS = ("Succeeded", "Complete")


class JobFailed(RuntimeError):
    """The job ended Failed; the message holds the reason, the pod's last lines and events."""


class JobDeleted(RuntimeError):
    """The job was deleted while the launcher waited for it."""


class JobTimeout(TimeoutError):
    """The job did not finish within the launcher's timeout."""


@dataclass(frozen=True)
class JobOutcome:
    name: str
    namespace: str
    state: str
    adopted: bool
    seconds: float
    queued_s: float = 0.0  # of ``seconds``, the time the job waited suspended (in its Kueue queue)


def suspended(obj: dict[str, Any]) -> bool | None:
    """The job's ``spec.suspend`` (TrainJob) or ``spec.runPolicy.suspend`` (PyTorchJob):
    what Kueue sets while the job waits in its queue; None when the spec does not say."""
    spec = obj.get("spec") or {}
    for holder in (spec, spec.get("runPolicy") or {}):
        if holder.get("suspend") is not None:
            return bool(holder["suspend"])
    return None


def job_state(obj: dict[str, Any]) -> tuple[str, str, str]:
    """``(state, reason, message)`` from a job's conditions and spec: ``Succeeded``,
    ``Failed``, ``Suspended`` (held, e.g. by Kueue: the spec says so, or the operator's
    ``Suspended`` condition does), ``Resuming`` (the spec resumed, the operator not yet), or
    the newest other true condition (``Created``, ``Running``, ``Restarting``...), else ``Pending``."""
    conds = [c for c in ((obj.get("status") or {}).get("conditions") or []) if str(c.get("status")) == "True"]
    for c in conds:
        if c.get("type") == "Failed":
            return "Failed", c.get("reason") or "", c.get("message") or ""
    for c in conds:
        if c.get("type") in SUCCESS_CONDITIONS:
            return "Succeeded", c.get("reason") or "", c.get("message") or ""
    held = next((c for c in conds if c.get("type") == "Suspended"), None)
    spec_says = suspended(obj)
    if spec_says or (spec_says is None and held is not None):
        return "Suspended", (held or {}).get("reason") or "", (held or {}).get("message") or ""
    if held is not None:
        return "Resuming", "", ""
    others = [c for c in conds if c.get("type") != "Suspended"]
    if others:
        c = others[-1]
        return c.get("type") or "Pending", c.get("reason") or "", c.get("message") or ""
    return "Pending", "", ""


class _Terminated(BaseException):
    """SIGTERM reached the launcher: unwound to :meth:`JobLauncher.run`, which deletes the job."""


def _retried(e: Exception) -> bool:
    """Whether following a job goes on after ``e``: transient API trouble (not 401 or 403),
    never the job's own end (failed, deleted, past its timeout)."""
    if isinstance(e, (JobDeleted, JobFailed, JobTimeout)):
        return False
    return status_of(e) not in (401, 403) and transient(e)


class JobLauncher:
    """Creates (or adopts) one job and follows it to its end; see the module doc."""

    def __init__(self, kind: JobKind | str, custom: Any = None, core: Any = None, poll_s: float = 5.0,
                 log_lines: int = 40, stream_logs: bool = True):
        self.kind = KINDS[kind] if isinstance(kind, str) else kind
        self.custom, self.core = custom_objects_api(custom), core_v1_api(core)
        self.poll_s = poll_s
        self.log_lines = log_lines
        self.stream_logs = stream_logs
        self._seen_events: set[str] = set()
        self._last_pods = 0.0
        self._last_state: str | None = None
        self._queued_s = 0.0                        # time spent suspended, done
        self._suspended_since: float | None = None  # suspended now, since then
        self._terminated = False
        self._streams: dict[str, threading.Thread] = {}
        self._stream_ended: dict[str, float] = {}

    # ---------------------------------------------------------------- the API, by kind
    def _get(self, name: str, ns: str) -> dict[str, Any]:
        k = self.kind
        return self.custom.get_namespaced_custom_object(k.group, k.version, ns, k.plural, name)

    def create_or_adopt(self, job: dict[str, Any], gone_timeout_s: float = 300.0) -> bool:
        """Create ``job``; True when a live job of ours with its name was adopted. A job of
        ours that failed or is being deleted (an earlier attempt's) is removed and created
        anew: the trainer resumes from its latest checkpoint."""
        from kubernetes.client.rest import ApiException

        k, meta = self.kind, job["metadata"]
        name, ns = meta["name"], meta["namespace"]
        for _ in range(2):
            try:
                self.custom.create_namespaced_custom_object(k.group, k.version, ns, k.plural, job)
                log.info("%s %s/%s created", k.kind, ns, name)
                return False
            except ApiException as e:
                if status_of(e) != 409:
                    raise
            existing = self._get(name, ns)
            theirs = (existing.get("metadata") or {}).get("labels") or {}
            if theirs.get(JOB_LABEL) != name:
                raise ConfigError(f"{k.kind} {ns}/{name} exists and was not created by mtnlg "
                                  f"(no {JOB_LABEL} label): choose another name")
            state = job_state(existing)[0]
            if state != "Failed" and not (existing.get("metadata") or {}).get("deletionTimestamp"):
                log.info("%s %s/%s exists (a retried step): adopting it, state %s", k.kind, ns, name, state)
                return True
            log.info("%s %s/%s exists but %s: deleting it and creating it again", k.kind, ns, name,
                     "failed" if state == "Failed" else "is being deleted")
            self.delete(name, ns)
            self._wait_gone(name, ns, gone_timeout_s)
        raise RuntimeError(f"{k.kind} {ns}/{name} could not be created again")

    def _wait_gone(self, name: str, ns: str, timeout_s: float) -> None:
        from kubernetes.client.rest import ApiException

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._get(name, ns)
            except ApiException as e:
                if status_of(e) == 404:
                    return
                raise
            time.sleep(min(1.0, self.poll_s))
        raise JobTimeout(f"{self.kind.kind} {ns}/{name} still exists {timeout_s:.0f}s after its deletion")

    def delete(self, name: str, ns: str) -> bool:
        """Delete the job and, in the foreground, its pods; False when it was already gone."""
        from kubernetes.client.rest import ApiException

        k = self.kind
        try:
            self.custom.delete_namespaced_custom_object(k.group, k.version, ns, k.plural, name,
                                                        body={"propagationPolicy": "Foreground"})
        except ApiException as e:
            if status_of(e) == 404:
                return False
            raise
        log.info("%s %s/%s deleted", k.kind, ns, name)
        return True

    # ---------------------------------------------------------------- pods
    def pods(self, name: str, ns: str) -> list[Any]:
        """The job's pods, node 0 first (selected client-side too: not every server filters)."""
        k = self.kind
        items = self.core.list_namespaced_pod(ns, label_selector=f"{JOB_LABEL}={name}").items

        def labels(p):
            return (p.metadata.labels or {}) if p.metadata else {}

        mine = [p for p in items if labels(p).get(JOB_LABEL) == name or labels(p).get(k.pod_job_label) == name]
        key, value = k.node0_label
        return sorted(mine, key=lambda p: (labels(p).get(key) != value, p.metadata.name))

    def _events(self, pod: str, ns: str) -> list[Any]:
        items = self.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={pod}").items
        return [e for e in items if e.involved_object is None or e.involved_object.name == pod]

    def _observe_pods(self, name: str, ns: str) -> None:
        """Log scheduling trouble of pending pods once per event; start node 0's log stream."""
        for i, pod in enumerate(self.pods(name, ns)):
            phase = pod.status.phase if pod.status else None
            if phase == "Pending":
                for e in self._events(pod.metadata.name, ns):
                    key = f"{pod.metadata.name}/{e.metadata.name if e.metadata else ''}/{e.count or 1}"
                    if key not in self._seen_events and (e.type == "Warning" or e.reason == "FailedScheduling"):
                        self._seen_events.add(key)
                        log.warning("pod %s pending: %s: %s", pod.metadata.name, e.reason, e.message)
            elif i == 0 and phase in ("Running", "Succeeded", "Failed") and self.stream_logs:
                self._start_log_stream(pod.metadata.name, ns)

    def _start_log_stream(self, pod: str, ns: str) -> None:
        """Follow ``pod``'s log; again, from where it stopped, after a container restart."""
        t = self._streams.get(pod)
        if t is not None and t.is_alive():
            return
        since = int(time.monotonic() - self._stream_ended[pod]) + 1 if pod in self._stream_ended else 0

        def follow() -> None:
            try:
                extra = {"since_seconds": since} if since else {}
                resp = self.core.read_namespaced_pod_log(pod, ns, container=self.kind.container, follow=True,
                                                         _preload_content=False, **extra)
                buf = b""
                for chunk in resp.stream(4096):
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        log.info("[%s] %s", pod, line.decode("utf-8", "replace"))
                if buf:
                    log.info("[%s] %s", pod, buf.decode("utf-8", "replace"))
            except Exception as e:  # noqa: BLE001 - a lost log stream must not fail the run
                log.warning("log stream of pod %s ended: %s", pod, e)
            finally:
                self._stream_ended[pod] = time.monotonic()

        t = threading.Thread(target=follow, name=f"log-{pod}", daemon=True)
        self._streams[pod] = t
        t.start()

    def _drain_logs(self, name: str, ns: str, timeout_s: float = 15.0) -> None:
        """At the job's end: node 0's whole log reaches this log before the pods may go."""
        try:
            self._observe_pods(name, ns)
        except Exception as e:  # noqa: BLE001 - the outcome matters more than the log
            log.warning("could not read the pods of %s/%s: %s", ns, name, e)
        deadline = time.monotonic() + timeout_s
        for t in self._streams.values():
            t.join(max(0.0, deadline - time.monotonic()))

    def failure_report(self, name: str, ns: str, reason: str, message: str) -> str:
        """The condition's reason and message, the failing pod's last lines and events."""
        parts = [f"{self.kind.kind} {ns}/{name} failed: {reason or 'Failed'}: {message or '(no message)'}"]
        try:
            pods = self.pods(name, ns)
        except Exception as e:  # noqa: BLE001 - the condition's reason is reported whatever happens
            return "\n".join(parts + [f"(pods unavailable: {e})"])

        def terminated(s):
            """The container's failed termination: now, or before its restart (CrashLoopBackOff)."""
            for st in (s.state, s.last_state):
                t = st.terminated if st is not None else None
                if t is not None and t.exit_code:
                    return t
            return None

        def failed(p) -> bool:
            statuses = (p.status.container_statuses or []) if p.status else []
            return bool((p.status and p.status.phase == "Failed") or any(terminated(s) for s in statuses))

        culprit = next((p for p in pods if failed(p)), pods[0] if pods else None)
        if culprit is not None:
            pod = culprit.metadata.name
            for s in (culprit.status.container_statuses or []) if culprit.status else []:
                t = terminated(s)
                if t is not None:
                    parts.append(f"pod {pod} container {s.name}: exit code {t.exit_code} ({t.reason or 'Error'})")
            try:
                text = self.core.read_namespaced_pod_log(pod, ns, container=self.kind.container,
                                                         tail_lines=self.log_lines)
                lines = [ln for ln in str(text).splitlines() if ln.strip()][-self.log_lines:]
                if lines:
                    parts.append(f"last {len(lines)} log lines of pod {pod}:\n  " + "\n  ".join(lines))
            except Exception as e:  # noqa: BLE001 - the report says what it could not read
                parts.append(f"(log of pod {pod} unavailable: {e})")
            try:
                events = [f"{e.reason}: {e.message}" for e in self._events(pod, ns)]
            except Exception as e:  # noqa: BLE001
                events = [f"(events unavailable: {e})"]
            if events:
                parts.append(f"events of pod {pod}:\n  " + "\n  ".join(events[-10:]))
        return "\n".join(parts)

    # ---------------------------------------------------------------- waiting
    def wait(self, name: str, ns: str, timeout_s: float | None = None) -> str:
        """Follow the job until it succeeds (returns ``Succeeded``) or raises. Transient API
        trouble (a restarting API server, a dropped connection, 429/5xx) is logged and
        retried with back-off; 401, 403 and a deleted job are not."""
        k = self.kind
        start = time.monotonic()
        self._last_state: str | None = None
        self._queued_s, self._suspended_since = 0.0, None

        def remaining() -> float | None:
            return None if timeout_s is None else timeout_s - (time.monotonic() - start - self.queued_s())

        def look() -> str | None:
            left = remaining()
            if left is not None and left <= 0:
                queued = f"; {fmt_time(self.queued_s())} in its queue not counted" if self.queued_s() >= 1 else ""
                raise JobTimeout(f"{k.kind} {ns}/{name} still {self._last_state or 'Pending'} after "
                                 f"{fmt_time(timeout_s)} (launcher timeout{queued})")
            if self._terminated:
                raise _Terminated()
            return "Succeeded" if self._look(name, ns, start) else None

        def changed(event: str, obj: dict[str, Any]) -> bool:
            if event == "DELETED":
                raise JobDeleted(f"{k.kind} {ns}/{name} was deleted while the launcher waited for it")
            return job_state(obj)[0] != self._last_state or self._terminated

        return watch_until(self.custom, k, name, ns, look, changed=changed, poll_s=self.poll_s,
                           remaining=remaining, retry=_retried)

    def queued_s(self) -> float:
        """How long the job followed has waited suspended (in its queue) so far."""
        now = time.monotonic()
        return self._queued_s + (now - self._suspended_since if self._suspended_since is not None else 0.0)

    def _log_state(self, obj: dict[str, Any], state: str, reason: str, start: float) -> None:
        """Log a new state; keep the time spent suspended (not counted against the timeout)."""
        k, meta = self.kind, obj.get("metadata") or {}
        name, ns = meta.get("name"), meta.get("namespace")
        now = time.monotonic()
        if self._suspended_since is not None and state != "Suspended":
            waited = now - self._suspended_since
            self._queued_s += waited
            self._suspended_since = None
            log.info("%s %s/%s left its queue after %s: admitted", k.kind, ns, name, fmt_time(waited))
        if state == "Suspended":
            self._suspended_since = now if self._suspended_since is None else self._suspended_since
            queue = (meta.get("labels") or {}).get(QUEUE_LABEL)
            where = (f"waits in queue {queue} until Kueue admits it (its ClusterQueue has quota for it)" if queue
                     else "held by spec.suspend until something resumes it")
            log.info("%s %s/%s: Suspended%s: %s; the launcher timeout does not run meanwhile (%s)", k.kind, ns,
                     name, f" ({reason})" if reason and reason != state else "", where, fmt_time(now - start))
        else:
            log.info("%s %s/%s: %s%s (%s)", k.kind, ns, name, state, f" ({reason})" if reason else "",
                     fmt_time(now - start))

    def _look(self, name: str, ns: str, start: float) -> bool:
        """One look at the job and its pods; True when it succeeded, JobFailed when it failed."""
        from kubernetes.client.rest import ApiException

        k = self.kind
        try:
            obj = self._get(name, ns)
        except ApiException as e:
            if status_of(e) == 404:
                raise JobDeleted(f"{k.kind} {ns}/{name} was deleted while the launcher waited for it") from None
            raise
        state, reason, message = job_state(obj)
        if state != self._last_state:
            self._log_state(obj, state, reason, start)
            self._last_state = state
        if state == "Succeeded":
            self._drain_logs(name, ns)
            return True
        if state == "Failed":
            self._drain_logs(name, ns, timeout_s=5.0)
            raise JobFailed(self.failure_report(name, ns, reason, message))
        if time.monotonic() - self._last_pods >= self.poll_s:
            try:
                self._observe_pods(name, ns)
            except Exception as e:  # noqa: BLE001 - pods are for the log; the job's state decides
                log.warning("could not look at the pods of %s/%s: %s", ns, name, e)
            self._last_pods = time.monotonic()
        return False

    # ---------------------------------------------------------------- the whole run
    def run(self, job: dict[str, Any], timeout_s: float | None = None, cleanup: str = "on-success") -> JobOutcome:
        """Create or adopt ``job``, follow it to its end, clean up by policy."""
        if cleanup not in CLEANUP:
            raise ConfigError(f"cleanup: expected one of {list(CLEANUP)}, got {cleanup!r}")
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        start = time.monotonic()
        old = None
        if threading.current_thread() is threading.main_thread():
            def on_sigterm(signum, frame):  # noqa: ARG001
                # Only a flag and an unwind: the deletion happens in run(), outside whatever
                # the main thread was in the middle of (an HTTP request holding a pool lock).
                self._terminated = True
                raise _Terminated()

            old = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            adopted = self.create_or_adopt(job)
            try:
                state = self.wait(name, ns, timeout_s)
            except JobTimeout:
                self.delete(name, ns)
                raise
            except JobFailed:
                if cleanup in ("on-failure", "always"):
                    self.delete(name, ns)
                raise
            if cleanup in ("on-success", "always"):
                self.delete(name, ns)
            return JobOutcome(name, ns, state, adopted, time.monotonic() - start, self.queued_s())
        except _Terminated:
            if old is not None:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one deletion, whatever else arrives
            log.warning("launcher received SIGTERM: deleting %s %s/%s", self.kind.kind, ns, name)
            try:
                self.delete(name, ns)
            except Exception as e:  # noqa: BLE001 - exit as asked; the owner reference collects the job
                log.warning("could not delete %s %s/%s: %s", self.kind.kind, ns, name, e)
            raise SystemExit(143) from None
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)


class ClusterJobLauncher(Launcher):
    """The train step on a cluster: ``job`` (a ``ClusterJobConfig`` with its name set) of
    ``job.nodes`` x ``job.procs_per_node`` processes trains the run config it is given.

    The data and the run directory must be where the pods reach them (gs://, s3://, or the
    shared volume ``job.volume_claim``, mounted here too); with a shared volume, locations
    the pods cannot reach are staged on it: the tokens copied there, the run trained there
    and copied back to ``cfg.output`` when the job succeeds. ``owner`` (the launcher's pod,
    :func:`mtnlg.cluster.incluster.pod_owner`) makes the job go when the pipeline run's pods
    go; ``timeout_s`` and ``cleanup`` are :meth:`JobLauncher.run`'s.
    """

    def __init__(self, job: ClusterJobConfig, timeout_s: float | None = None, cleanup: str = "on-success",
                 owner: dict[str, str] | None = None):
        if not job.name:
            raise ConfigError("name: the cluster job needs a name (steps.train_job_step derives one from the "
                              "pipeline run: jobs.job_name)")
        if cleanup not in CLEANUP:
            raise ConfigError(f"cleanup: expected one of {list(CLEANUP)}, got {cleanup!r}")
        self.job, self.timeout_s, self.cleanup, self.owner = job, timeout_s, cleanup, owner

    @property
    def world_size(self) -> int:
        return self.job.world_size

    def launch(self, cfg: TrainRunConfig) -> dict:
        job = self.job
        stage = storage.join(job.volume_mount, "mtnlg", job.name)
        inputs, output = cfg.data.path, cfg.output
        job_inputs, job_output = inputs, output
        if job.volume_claim and not reachable(inputs, job):
            job_inputs = storage.join(stage, "tokens")
            if not storage.exists(storage.join(job_inputs, "train.idx")):
                storage.copy_tree(inputs, job_inputs)
        if job.volume_claim and not reachable(output, job):
            job_output = storage.join(stage, "run")
        run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=job_inputs), output=job_output)
        obj = with_owner(build_job(job, run), self.owner)
        JobLauncher(job.backend).run(obj, timeout_s=self.timeout_s, cleanup=self.cleanup)
        if job_output != output:
            storage.copy_tree(job_output, output)
        summary = read_summary(output)
        if summary is None:
            raise FileNotFoundError(f"the {job.kind.kind} succeeded but wrote no summary.json under {job_output}")
        return summary
