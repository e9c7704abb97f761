"""Deploying the fused model on Kubeflow: a KServe ``InferenceService``, behind a gate.

    cfg = DeployConfig(name="gpt-docs", storage_uri="gs://bucket/run/model/hf", max_val_perplexity=300)
    decision = deploy_model(cfg, metrics)     # gate, then create or update, then wait until Ready

The service runs KServe's ``kserve-huggingfaceserver`` runtime on the Hugging Face export
the fuse step writes (``MODEL/hf``), which answers with an OpenAI-compatible API under
``/openai/v1`` (completions, chat completions), as ``mtnlg serve`` does locally.

**The gate** decides before anything is created or changed:

* ``max_val_perplexity``: deploy only at or below this validation perplexity;
* ``no_worse_than_deployed`` (default on): a service of ours already running with recorded
  metrics (its ``mtnlg.kubeflow.org/metrics`` annotation) is replaced only by a model no
  worse than it, within ``max_regression`` (relative). Models with different tokenizers
  cannot be compared by perplexity, so bits per byte is compared when both have it.

**Create or update.** A missing service is created; one of ours is replaced (its spec and
annotations, keeping its ``resourceVersion``); one that is not ours (no
``app.kubernetes.io/managed-by: mtnlg`` label) is an error, never overwritten. Then the
deployer watches it until ``Ready`` for the new generation, and fails with KServe's own
reason (``FailedToLoad`` and its message, the last conditions) or at ``timeout_s``; the
client set-up and the watch loop are the job launcher's (:mod:`mtnlg.cluster.client`).

**Sized from the model.** Unless set, the predictor's GPUs, CPU, memory and the runtime's
arguments come from the fused model it serves (its ``manifest.json``: parameters, weight
bytes, dtype; its ``config.json``: the context length): a GPU past ``GPU_PARAMETERS``;
memory 1.5 x the bytes the server holds the weights in, plus 2Gi, at least 4Gi; on vLLM
(the runtime's backend on GPUs) ``--dtype`` of the weights and ``--max_model_len`` of the
model's context. Explicit settings (``gpus``, ``memory``, ``dtype``, ``max_model_len``,
``args``) win. The predictor meets the restricted Pod Security Standard
(:mod:`mtnlg.cluster.podsecurity`; KServe's own injected containers are KServe's).

The deploying pod needs get, list, watch, create and update on ``inferenceservices``
(manifests/overlays/*/role.yaml).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from mtnlg.cluster import podsecurity
from mtnlg.cluster.client import CustomResource, custom_objects_api, status_of, watch_until
from mtnlg.config import Config, ConfigError
from mtnlg.progress import fmt_time, get_logger

log = get_logger("mtnlg.cluster")

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
INFERENCE_SERVICES = CustomResource(GROUP, VERSION, PLURAL, KIND)
MANAGED_BY = "app.kubernetes.io/managed-by"
METRICS_ANNOTATION = "mtnlg.kubeflow.org/metrics"
MODEL_ANNOTATION = "mtnlg.kubeflow.org/model"
RUN_ANNOTATION = "mtnlg.kubeflow.org/pipeline-run"
GATED_METRICS = ("val_perplexity", "val_loss", "val_bits_per_byte", "cloze_accuracy", "cloze_items",
                 "parameters", "train_steps")
GPU_PARAMETERS = 1_000_000_000  # past about 1B parameters a model is served on a GPU by default
# the fused weights' dtype -> the runtime's --dtype; bytes per parameter of each
RUNTIME_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
MEMORY_HEADROOM, MEMORY_BASE_GI, MEMORY_MIN_GI = 1.5, 2, 4


class DeployRejected(RuntimeError):
    """The gate refused the model (with ``fail_on_gate``)."""


class DeployFailed(RuntimeError):
    """The InferenceService did not become Ready: KServe's reason and message."""


@dataclass
class DeployConfig(Config):
    # InferenceService name: an RFC 1035 label (KServe's rule) short enough for the predictor's
    # host name, <name>-predictor-<namespace> (at most 63 characters)
    name: str = "mtnlg-gpt"
    namespace: str = "kubeflow"
    # the Hugging Face model directory: gs://, s3:// or pvc://CLAIM/PATH (fuse writes MODEL/hf)
    storage_uri: str = ""
    runtime: str = "kserve-huggingfaceserver"
    # the model id clients ask for (default: the service name)
    model_name: str = ""
    # the runtime's backend: "" (its default: vLLM on GPUs), or "huggingface" (transformers, any device)
    backend: str = ""
    max_model_len: int = field(default=0, metadata={"min": 0})  # 0 = the model's context (vLLM: passed)
    # the runtime's --dtype ("" = on vLLM the fused weights' dtype, else the runtime's default)
    dtype: str = field(default="", metadata={"choices": ("", "auto", "float32", "bfloat16", "float16")})
    args: list[str] = field(default_factory=list)               # more runtime arguments (they win)
    gpus: int | None = field(default=None, metadata={"min": 0})  # None = 1 past GPU_PARAMETERS, else 0
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = ""        # "" = 4 with GPUs, 1 without
    memory: str = ""     # "" = from the model's weights (at least 4Gi)
    run_as_user: int = field(default=podsecurity.IMAGE_USER, metadata={"min": 1})  # the runtime image's user
    min_replicas: int = field(default=1, metadata={"min": 0})
    max_replicas: int = field(default=1, metadata={"min": 1})
    # the service account whose secrets give the storage initializer access to storage_uri
    service_account: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # the gate
    max_val_perplexity: float | None = field(default=None, metadata={"gt": 0.0})
    no_worse_than_deployed: bool = True
    max_regression: float = field(default=0.0, metadata={"min": 0.0})
    fail_on_gate: bool = False   # a refused model fails the step (default: it is recorded and skipped)
    # waiting
    timeout_s: float = field(default=1800.0, metadata={"gt": 0.0})
    poll_s: float = field(default=10.0, metadata={"gt": 0.0})

    def validate(self) -> None:
        from mtnlg.cluster.admission import check_name

        if not self.namespace:
            raise ConfigError("namespace: must be set")
        check_name(KIND, self.name, namespace=self.namespace)
        if self.storage_uri and not re.match(r"^(gs|s3|pvc|hf|https?)://", self.storage_uri):
            raise ConfigError(f"storage_uri: {self.storage_uri!r} must be gs://, s3://, pvc:// (or hf://, https://): "
                              "the KServe storage initializer downloads it into the pod")
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        if self.backend not in ("", "huggingface", "vllm"):
            raise ConfigError(f"backend: expected '', 'huggingface' or 'vllm', got {self.backend!r}")
        from mtnlg.cluster.jobs import QUANTITY

        for key in ("cpu", "memory"):
            value = getattr(self, key)
            if value and not QUANTITY.match(value):
                raise ConfigError(f"{key}: {value!r} is not a Kubernetes quantity (e.g. \"2\", \"16Gi\")")


@dataclass(frozen=True)
class ModelFacts:
    """What sizing reads of the fused model: its ``manifest.json`` and ``config.json``."""

    parameters: int
    weight_bytes: int
    dtype: str     # the fused weights': fp32, bf16, fp16
    context: int   # the model's seq_length


def read_model_facts(model_dir: str) -> ModelFacts | None:
    """The fused model's size, or None (logged) when its files cannot be read."""
    from mtnlg import storage
    from mtnlg.formats.rundir import MANIFEST, MODEL_CONFIG

    try:
        manifest = json.loads(storage.read_text(storage.join(model_dir, MANIFEST)))
        config = json.loads(storage.read_text(storage.join(model_dir, MODEL_CONFIG)))
        return ModelFacts(int(manifest["parameters"]), int(manifest["weight_bytes"]), str(manifest["dtype"]),
                          int(config["seq_length"]))
    except Exception as e:  # noqa: BLE001 - sizing falls back to fixed defaults, said in the log
        log.warning("could not read the size of the model at %s (%s: %s): the InferenceService gets 1 CPU and 4Gi "
                    "and no GPU unless deploy_overrides say otherwise", model_dir, type(e).__name__, e)
        return None


@dataclass(frozen=True)
class Sizing:
    """The predictor's resources and the runtime arguments that follow from the model."""

    gpus: int
    cpu: str
    memory: str
    vllm: bool          # the runtime will (most likely) run vLLM: GPUs and no other backend asked for
    args: list[str]     # --dtype, --max_model_len as derived (before c.args)


def size_service(c: DeployConfig, model: ModelFacts | None = None) -> Sizing:
    """GPUs, CPU, memory and runtime arguments for ``c`` serving ``model`` (see the module doc)."""
    gpus = c.gpus if c.gpus is not None else int(model is not None and model.parameters > GPU_PARAMETERS)
    vllm = c.backend == "vllm" or (c.backend == "" and gpus > 0)
    given = {a.lstrip("-").split("=", 1)[0].replace("-", "_") for a in c.args}
    dtype = c.dtype or (RUNTIME_DTYPES.get(model.dtype, "") if vllm and model is not None else "")
    max_len = c.max_model_len or (model.context if vllm and model is not None else 0)
    args = []
    if dtype and "dtype" not in given:
        args.append(f"--dtype={dtype}")
    if max_len and not {"max_model_len", "max_length"} & given:
        args.append(f"--max_model_len={max_len}")
    memory = c.memory or f"{MEMORY_MIN_GI}Gi"
    if not c.memory and model is not None:
        held = dtype if dtype not in ("", "auto") else ("float16" if gpus else "float32")  # KServe's auto
        need = model.parameters * DTYPE_BYTES[held] * MEMORY_HEADROOM / 2**30 + MEMORY_BASE_GI
        memory = f"{max(MEMORY_MIN_GI, math.ceil(need))}Gi"
    return Sizing(gpus, c.cpu or ("4" if gpus else "1"), memory, vllm, args)


# ---------------------------------------------------------------------------------------
# the object
# ---------------------------------------------------------------------------------------


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def recorded_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The evaluation figures the service records (and the gate compares)."""
    return {k: _number(metrics[k]) for k in GATED_METRICS if _number(metrics.get(k)) is not None}


def inference_service(c: DeployConfig, metrics: dict[str, Any] | None = None, model_uri: str = "",
                      run_id: str = "", model: ModelFacts | None = None) -> dict[str, Any]:
    """The InferenceService for ``c`` (``serving.kserve.io/v1beta1``) serving ``model`` (sized
    from it: :func:`size_service`), recording ``metrics`` and the lineage (the fused model's
    URI, the pipeline run) in annotations; ``ConfigError`` (``admission.AdmissionError``)
    when the cluster would refuse it."""
    from mtnlg.cluster.admission import admit

    if not c.storage_uri:
        raise ConfigError("storage_uri: the Hugging Face model directory to serve must be set")
    size = size_service(c, model)
    args = [f"--model_name={c.model_name or c.name}"]
    if c.backend:
        args.append(f"--backend={c.backend}")
    args += size.args + list(c.args)
    limits: dict[str, str] = {"cpu": size.cpu, "memory": size.memory}
    if size.gpus:
        limits[c.gpu_resource] = str(size.gpus)
    predictor: dict[str, Any] = {
        "minReplicas": c.min_replicas, "maxReplicas": c.max_replicas,
        "securityContext": podsecurity.pod_security_context(c.run_as_user),
        "model": {"modelFormat": {"name": "huggingface"}, "runtime": c.runtime, "storageUri": c.storage_uri,
                  "args": args, "resources": {"requests": dict(limits), "limits": limits},
                  "securityContext": podsecurity.container_security_context()},
    }
    if c.service_account:
        predictor["serviceAccountName"] = c.service_account
    if c.node_selector:
        predictor["nodeSelector"] = dict(c.node_selector)
    annotations = {METRICS_ANNOTATION: json.dumps(recorded_metrics(metrics or {}), sort_keys=True)}
    if model_uri:
        annotations[MODEL_ANNOTATION] = model_uri
    if run_id:
        annotations[RUN_ANNOTATION] = run_id
    obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
           "metadata": {"name": c.name, "namespace": c.namespace,
                        "labels": {**c.labels, MANAGED_BY: "mtnlg"}, "annotations": annotations},
           "spec": {"predictor": predictor}}
    admit(obj)  # before anything is created: what the API server and KServe's webhook would refuse
    return obj


# ---------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    deploy: bool
    reason: str


def gate(c: DeployConfig, metrics: dict[str, Any], deployed: dict[str, Any] | None) -> GateDecision:
    """Whether the model with ``metrics`` may replace what is ``deployed`` (the current
    InferenceService, or None)."""
    ppl = _number(metrics.get("val_perplexity"))
    if c.max_val_perplexity is not None:
        if ppl is None:
            return GateDecision(False, "the evaluation has no validation perplexity to compare with "
                                       f"max_val_perplexity={c.max_val_perplexity:g}")
        if ppl > c.max_val_perplexity:
            return GateDecision(False, f"validation perplexity {ppl:.4g} is above max_val_perplexity="
                                       f"{c.max_val_perplexity:g}")
    if c.no_worse_than_deployed and deployed is not None:
        try:
            theirs = json.loads(((deployed.get("metadata") or {}).get("annotations") or {}).get(METRICS_ANNOTATION)
                                or "{}")
        except json.JSONDecodeError:
            theirs = {}
        ours = recorded_metrics(metrics)
        key = next((k for k in ("val_bits_per_byte", "val_perplexity") if k in ours and _number(theirs.get(k))), None)
        if key is None:
            return GateDecision(True, "the deployed model has no comparable recorded metrics")
        old, new = float(theirs[key]), ours[key]
        allowed = old * (1 + c.max_regression)
        if new > allowed:
            return GateDecision(False, f"{key} {new:.4g} is worse than the deployed model's {old:.4g}"
                                       + (f" (allowed up to {allowed:.4g})" if c.max_regression else ""))
        return GateDecision(True, f"{key} {new:.4g} is no worse than the deployed model's {old:.4g}")
    if c.max_val_perplexity is not None:
        return GateDecision(True, f"validation perplexity {ppl:.4g} is within max_val_perplexity="
                                  f"{c.max_val_perplexity:g}")
    return GateDecision(True, "no gate configured, or nothing deployed to compare with")


# ---------------------------------------------------------------------------------------
# create or update, and wait
# ---------------------------------------------------------------------------------------


def service_state(obj: dict[str, Any]) -> tuple[str, str, str]:
    """``(state, reason, message)``: ``Ready``; ``Failed`` when the model failed to load;
    else ``NotReady`` with the first false condition's reason (or ``Pending``)."""
    status = obj.get("status") or {}
    gen, seen = (obj.get("metadata") or {}).get("generation"), status.get("observedGeneration")
    conds = status.get("conditions") or []
    model = status.get("modelStatus") or {}
    if (model.get("states") or {}).get("targetModelState") == "FailedToLoad" or \
            (model.get("transitionStatus") == "BlockedByFailedLoad"):
        info = model.get("lastFailureInfo") or {}
        return "Failed", info.get("reason") or "FailedToLoad", info.get("message") or "the model failed to load"
    stale = gen is not None and seen is not None and int(seen) < int(gen)
    ready = next((c for c in conds if c.get("type") == "Ready"), None)
    if ready is not None and str(ready.get("status")) == "True" and not stale:
        return "Ready", ready.get("reason") or "", ready.get("message") or ""
    bad = next((c for c in conds if str(c.get("status")) == "False"), None)
    if bad is not None:
        return "NotReady", bad.get("reason") or bad.get("type") or "", bad.get("message") or ""
    return "Pending", "", ""


class ServingDeployer:
    """Creates or updates one InferenceService and waits until it is Ready."""

    def __init__(self, custom: Any = None):
        self.custom = custom_objects_api(custom)

    def get(self, name: str, ns: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as e:
            if status_of(e) == 404:
                return None
            raise

    def apply(self, obj: dict[str, Any], current: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Create ``obj``, or replace the service of ours of that name: ``("created" |
        "updated", the object as stored)``."""
        from kubernetes.client.rest import ApiException

        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        for _ in range(5):  # another writer between our GET and PUT: read again and retry
            cur = current if current is not None else self.get(name, ns)
            current = None
            if cur is None:
                try:
                    return "created", self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, obj)
                except ApiException as e:
                    if e.status == 409:
                        continue
                    raise
            labels = (cur.get("metadata") or {}).get("labels") or {}
            if labels.get(MANAGED_BY) != "mtnlg":
                raise DeployFailed(f"InferenceService {ns}/{name} exists and is not managed by mtnlg "
                                   f"(label {MANAGED_BY}={labels.get(MANAGED_BY)!r}): refusing to overwrite it; "
                                   "choose another name or delete it")
            new = dict(obj)
            meta = dict(cur.get("metadata") or {})
            meta["labels"] = {**(meta.get("labels") or {}), **obj["metadata"]["labels"]}
            meta["annotations"] = {**(meta.get("annotations") or {}), **obj["metadata"]["annotations"]}
            new["metadata"] = meta
            try:
                return "updated", self.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, new)
            except ApiException as e:
                if e.status == 409:
                    continue
                raise
        raise DeployFailed(f"InferenceService {ns}/{name} kept changing under us: gave up after 5 tries")

    def wait_ready(self, name: str, ns: str, timeout_s: float, poll_s: float = 10.0) -> dict[str, Any]:
        """Watch the service until Ready for its current generation; raise DeployFailed on a
        failed load or at ``timeout_s`` (with the last conditions)."""
        start = time.monotonic()
        last = None

        def remaining() -> float:
            return timeout_s - (time.monotonic() - start)

        def look() -> dict[str, Any] | None:
            nonlocal last
            obj = self.get(name, ns)
            if obj is None:
                raise DeployFailed(f"InferenceService {ns}/{name} was deleted while waiting for it")
            state, reason, message = service_state(obj)
            if (state, reason) != last:
                log.info("InferenceService %s/%s: %s%s%s (%s)", ns, name, state, f" ({reason})" if reason else "",
                         f": {message}" if message else "", fmt_time(time.monotonic() - start))
                last = (state, reason)
            if state == "Ready":
                return obj
            if state == "Failed":
                raise DeployFailed(f"InferenceService {ns}/{name} failed: {reason}: {message}")
            if remaining() <= 0:
                conds = "; ".join(f"{c.get('type')}={c.get('status')} {c.get('reason') or ''} {c.get('message') or ''}"
                                  .strip() for c in ((obj.get("status") or {}).get("conditions") or []))
                raise DeployFailed(f"InferenceService {ns}/{name} not Ready after {fmt_time(timeout_s)}: "
                                   f"{state} {reason} {message}".strip() + (f" [{conds}]" if conds else ""))
            return None

        def changed(event: str, obj: dict[str, Any]) -> bool:
            return event == "DELETED" or service_state(obj)[:2] != last

        return watch_until(self.custom, INFERENCE_SERVICES, name, ns, look, changed=changed, poll_s=poll_s,
                           remaining=remaining)


def deploy_model(c: DeployConfig, metrics: dict[str, Any], model_uri: str = "", run_id: str = "",
                 custom: Any = None) -> dict[str, Any]:
    """Gate, then create or update the InferenceService and wait until it is Ready. Returns
    the decision: ``{"deployed", "reason", "action", "name", "namespace", "url", ...}``."""
    deployer = ServingDeployer(custom)
    current = deployer.get(c.name, c.namespace)
    decision = gate(c, metrics, current if current is not None and
                    ((current.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY) == "mtnlg" else None)
    out: dict[str, Any] = {"deployed": False, "reason": decision.reason, "name": c.name, "namespace": c.namespace,
                           "storage_uri": c.storage_uri, "metrics": recorded_metrics(metrics)}
    if not decision.deploy:
        log.warning("not deploying %s/%s: %s", c.namespace, c.name, decision.reason)
        if c.fail_on_gate:
            raise DeployRejected(f"the gate refused the model: {decision.reason}")
        return {**out, "action": "skipped"}
    log.info("deploying %s as InferenceService %s/%s: %s", c.storage_uri, c.namespace, c.name, decision.reason)
    auto = c.gpus is None or not c.memory or not c.dtype or not c.max_model_len
    model = read_model_facts(model_uri) if model_uri and auto else None
    size = size_service(c, model)
    log.info("InferenceService %s/%s: %d GPU, %s CPU, %s memory%s%s", c.namespace, c.name, size.gpus, size.cpu,
             size.memory, f", {' '.join(size.args)}" if size.args else "",
             f" (from the model: {model.parameters:,} parameters, {model.dtype})" if model else "")
    obj = inference_service(c, metrics, model_uri=model_uri, run_id=run_id, model=model)
    action, _ = deployer.apply(obj, current)
    log.info("InferenceService %s/%s %s; waiting until it is Ready (timeout %s)", c.namespace, c.name, action,
             fmt_time(c.timeout_s))
    ready = deployer.wait_ready(c.name, c.namespace, c.timeout_s, c.poll_s)
    url = (ready.get("status") or {}).get("url") or ""
    return {**out, "deployed": True, "action": action, "url": url,
            "openai_base_url": f"{url}/openai/v1" if url else "",
            "resources": {"gpus": size.gpus, "cpu": size.cpu, "memory": size.memory, "args": size.args}}
