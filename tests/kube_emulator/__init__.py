"""An offline, in-process Kubernetes API server for tests, built on ``kmock``.

The real ``kubernetes`` client talks to it over HTTP on 127.0.0.1; a test plays the
operator/kubelet through the emulator's own methods, which change the cluster state directly
(and wake the client's watches), e.g.::

    with KubeEmulator() as kube:
        custom = kubernetes.client.CustomObjectsApi(kube.api_client)
        custom.create_namespaced_custom_object("kubeflow.org", "v1", "ns", "pytorchjobs", job)
        job = kube.get_object(*PYTORCHJOBS, "ns", "job-1")          # a dict, uid stamped
        pod = kube.create_pod("ns", "job-1-master-0", labels={...}, phase="Running", owner=job)
        kube.set_pod_log("ns", "job-1-master-0", "step 1\\nstep 2\\n")
        kube.create_event("ns", "job-1-master-0", reason="Pulled", message="image pulled")
        kube.set_condition(*PYTORCHJOBS, "ns", "job-1", "Succeeded")  # watchers get MODIFIED

``kmock.KubernetesEmulator`` (0.8) provides the HTTP routing of Kubernetes URLs, API
discovery, the object store (``kmock.objects``, with every version), the per-resource event
buses, Kubernetes-style error bodies and its reaction DSL (``kube.kmock[...] << ...``, e.g.
to inject a 500); its own create/get/list/watch handlers are replaced here by ones that add
what the Kubernetes client relies on and kmock lacks:

* ``?watch=True`` (what the Python client sends) is read as ``watch=true``; so are
  ``follow=True`` and the other boolean query parameters;
* ``metadata.uid``, ``resourceVersion`` (one counter for the whole cluster, bumped on every
  change), ``creationTimestamp``, ``generation``, ``namespace``; ``generateName``;
  ``apiVersion``/``kind`` when missing; new pods get ``status.phase: Pending``;
* label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and field
  selectors (``=``, ``==``, ``!=`` on any dotted path, e.g. ``metadata.name``,
  ``involvedObject.name``, ``status.phase``) on list, watch and delete-collection;
* watch: ``timeoutSeconds`` (the server ends the stream, as the real one does),
  ``resourceVersion`` (replays the changes after that version from a journal, so
  ``kubernetes.watch.Watch`` reconnects see no duplicate ADDED events; a version older than
  :meth:`KubeEmulator.expire_watch_history` gets the ``ERROR 410 Gone`` event); no event is
  lost between the initial state and the live stream;
* PATCH as a JSON merge patch (dict body; also what strategic merge patches become) or a
  JSON patch (list body); the ``status`` subresource changes only ``.status``;
  PUT (replace) with the optimistic-concurrency 409 on a stale ``resourceVersion``, keeping
  ``.status`` as it was (as for resources with a status subresource);
* DELETE honours finalizers (``deletionTimestamp`` first, gone when the last finalizer
  goes), cascades to objects whose ``ownerReferences`` name the deleted uid (unless
  ``propagationPolicy: Orphan``; Foreground is done at once, like Background);
  DELETE on a collection (with selectors);
* ``pods/{name}/log`` serves text set by the test, with ``container``, ``tailLines``,
  ``limitBytes``, and ``follow=true`` streaming: the text so far, then what
  :meth:`KubeEmulator.append_pod_log` adds, until the log is finished, the pod reaches
  Succeeded/Failed, the pod is deleted or the emulator stops;
* error bodies like the real server's: 404 ``NotFound`` and 409 ``AlreadyExists`` /
  ``Conflict`` with ``details`` ``{name, group, kind}``;
* admission of TrainJobs, PyTorchJobs and InferenceServices that a client creates (POST),
  replaces (PUT) or patches as a cluster admits them (``mtnlg.cluster.admission.admit``):
  ObjectMeta, the CRD's OpenAPI schema and CEL rules (``x-kubernetes-validations``; on an
  update the transition rules too, against the stored object; the status subresource is not
  admitted) when the CRD file is found (``crds``;
  by default ``../shared/schemas``), then the operator's validating webhook. A refusal is
  the real answer: 422 ``Invalid`` with ``details.causes``, 403 "admission webhook ...
  denied the request", or 400 for unknown fields with ``?fieldValidation=Strict`` (without
  it they are dropped, as the API server prunes them). The test's own direct methods (the
  operator's side) are not admitted;
* mutating admission webhooks: functions registered with :meth:`KubeEmulator.mutate` change
  a client's object on create and update before it is validated, as the API server runs
  them (e.g. a test-side Kueue that suspends every job naming a queue).

The parts: :mod:`.resources` (the resources, their kinds and CRDs, the API's errors),
:mod:`.selectors` (label and field selectors), :mod:`.patching` (merge and JSON patches),
:mod:`.server` (the API server on kmock: state, watches, deletion, logs, admission) and
:mod:`.facade` (:class:`KubeEmulator`, what tests use).

Not emulated: authentication/RBAC, admission and validation of other resources (any dict is
accepted; a CRD need not exist, though listing a resource nobody declared or created is a
404, as for a missing CRD), defaulting beyond the above, strategic-merge list semantics (lists are
replaced), server-side apply, ``limit``/``continue`` paging (all items in one page),
BOOKMARK events, watch events for objects moving in/out of a selector (an event is sent
when the object *after* the change matches), ``exec``/``attach``/``portforward``,
namespaces' existence, and operators/kubelets: nothing happens unless the test does it
(directly, or from a reactor registered with :meth:`KubeEmulator.on`).

Concurrency: the server runs an asyncio loop in a daemon thread; every method of
:class:`KubeEmulator` is thread-safe and blocks until done, and must not be called from the
loop's own thread (i.e. not from a kmock reaction callback; reactors from :meth:`on` run in
a separate controller thread and may call them).
"""

from .facade import KubeEmulator
from .resources import (CLUSTERTRAININGRUNTIMES, CONFIGMAPS, DEFAULT_CRDS, DEFAULT_RESOURCES, EVENTS, INFERENCESERVICES,
                        JOBS, JOBSETS, PODS, PYTORCHJOBS, SECRETS, SERVICES, TRAININGRUNTIMES, TRAINJOBS, KubeError,
                        Resource, now_rfc3339)
from .selectors import match_fields, match_labels

__all__ = [
    "CLUSTERTRAININGRUNTIMES",
    "CONFIGMAPS",
    "DEFAULT_CRDS",
    "DEFAULT_RESOURCES",
    "EVENTS",
    "INFERENCESERVICES",
    "JOBS",
    "JOBSETS",
    "PODS",
    "PYTORCHJOBS",
    "SECRETS",
    "SERVICES",
    "TRAININGRUNTIMES",
    "TRAINJOBS",
    "KubeEmulator",
    "KubeError",
    "Resource",
    "match_fields",
    "match_labels",
    "now_rfc3339",
]
