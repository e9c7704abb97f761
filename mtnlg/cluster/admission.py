"""Admission of the objects we create, as the cluster does it: the Kubernetes API server's
checks of a TrainJob, PyTorchJob or InferenceService, then the operators' validating
webhooks, then (before creating, only) the names of the objects the operators will create
from it, which fail later, after the job was accepted.

    admit(job)                                 # AdmissionError (a ConfigError) naming field, rule and value
    admit(job, load_crd_schema(crd))           # with the CRD: its OpenAPI schema and CEL rules too
    except AdmissionError as e: e.status()     # the API server's answer: a v1 Status (400, 422 or 403)

The stages run in the API server's order; the first that refuses answers:

1. **Decoding** (400 BadRequest): unknown fields, refused as the API server refuses them
   under ``fieldValidation=Strict`` (what kubectl asks for); with ``"Warn"`` or ``"Ignore"``
   (the server's default for other clients) they are dropped from ``obj`` instead, as the
   server prunes them, and their paths returned.
2. **Validation** (422 Invalid, one cause per field): ObjectMeta (name a DNS-1123
   subdomain, namespace, label keys and values, annotation keys); with the CRD, its OpenAPI
   schema, then its ``x-kubernetes-validations`` rules (:mod:`mtnlg.cluster.cel`), which
   the server skips, with a cause saying so, after a required/type/enum/too-long/too-many
   error. Without the CRD, a TrainJob's name is checked against the CRD's two name rules,
   which this module knows (RFC 1035 label, at most 63 characters).
3. **Validating webhooks** (403, "admission webhook ... denied the request"):
   Kubeflow Trainer v2.3 for a TrainJob (a runtime kind it serves; the torch runtime's
   reserved ``PET_*`` variables; ``runtimePatches``: a domain-prefixed ``manager``, only the
   runtime's replicated jobs and containers, no ``env`` on the ``node`` container);
   Training Operator v1.9 for a PyTorchJob (name a DNS-1035 label; Master and Worker only;
   a ``pytorch`` container with an image in each; one Master; ``runPolicy.managedBy``;
   ``elasticPolicy``); KServe v0.20 for an InferenceService (its name rule; replicas).
4. **Names of the children** (``preflight``; the library only, as no API server refuses
   them at create): JobSet, which Trainer creates under the TrainJob's name, refuses a job
   whose longest pod name ``<job>-node-0-<nodes-1>-<5 random>`` is not a DNS-1035 label; the
   Training Operator names a pod and a Service ``<job>-master-0``, ``<job>-worker-<i>``; KServe
   names the predictor's Service ``<isvc>-predictor`` and, with its default domainTemplate
   ``{{ .Name }}-{{ .Namespace }}``, a host label ``<isvc>-predictor-<namespace>``: each at
   most 63 characters.

Not emulated: defaulting, the Trainer's lookup of the runtime object (a runtime this module
does not know has its patches unchecked), KServe's rules on fields we do not generate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mtnlg.config import ConfigError

_OMIT = object()
# reason -> how the API server words the error type (apimachinery's field.ErrorType)
_TYPES = {"FieldValueInvalid": "Invalid value", "FieldValueTypeInvalid": "Invalid value",
          "FieldValueRequired": "Required value", "FieldValueForbidden": "Forbidden",
          "FieldValueNotSupported": "Unsupported value", "FieldValueDuplicate": "Duplicate value",
          "FieldValueTooLong": "Too long", "FieldValueTooMany": "Too many", "FieldValueNotFound": "Not found",
          "InternalError": "Internal error"}
_BLOCKING = {"FieldValueNotSupported", "FieldValueRequired", "FieldValueTooLong", "FieldValueTooMany",
             "FieldValueTypeInvalid"}  # after these, the API server does not run the CEL rules
OBJECT_META = {"name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
               "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
               "ownerReferences", "finalizers", "managedFields"}
WEBHOOKS = {"TrainJob": "validator.trainjob.trainer.kubeflow.org",
            "PyTorchJob": "validator.pytorchjob.training-operator.kubeflow.org",
            "InferenceService": "inferenceservice.kserve-webhook-server.validator"}
# Trainer's reserved torchrun variables (pkg/constants TorchRunReservedEnvNames)
TORCH_RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
# The training runtimes this module knows: replicated job -> its containers (manifests/base/runtimes)
RUNTIMES = {"torch-distributed": {"node": {"node"}}}
TRAINER_JOB = "node"  # the replicated job of the trainer's nodes in Trainer's runtimes
MAX_LABEL = 63

# ------------------------------------------------------------------ apimachinery's name rules
_DNS1035 = "[a-z]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = _DNS1123_LABEL + r"(\." + _DNS1123_LABEL + ")*"
_QUALIFIED = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = "(" + _QUALIFIED + ")?"
_HTTP_PATH = r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+"


def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    """apimachinery's RegexError wording (its double space before "or" included)."""
    if examples:
        msg += " (e.g. " + " or ".join(f"'{e}', " for e in examples)
        return msg + f"regex used for validation is '{fmt}')"
    return msg + f" (regex used for validation is '{fmt}')"


def _max_len(n: int) -> str:
    return f"must be no more than {n} characters"


def _pattern_errors(value: str, max_len: int, pattern: str, what: str, *examples: str) -> list[str]:
    """apimachinery's messages for a name that is too long or does not match ``pattern``."""
    errs = [_max_len(max_len)] if len(value) > max_len else []
    if not re.fullmatch(pattern, value):
        errs.append(_regex_error(what, pattern, *examples))
    return errs


def dns1035_label_errors(value: str) -> list[str]:
    """apimachinery's ``IsDNS1035Label``: the messages of what ``value`` breaks."""
    return _pattern_errors(value, MAX_LABEL, _DNS1035, "a DNS-1035 label must consist of lower case alphanumeric "
                           "characters or '-', start with an alphabetic character, and end with an alphanumeric "
                           "character", "my-name", "abc-123")


def _dns1123_label_errors(value: str) -> list[str]:
    return _pattern_errors(value, MAX_LABEL, _DNS1123_LABEL, "a lowercase RFC 1123 label must consist of lower case "
                           "alphanumeric characters or '-', and must start and end with an alphanumeric character",
                           "my-name", "123-abc")


def dns1123_subdomain_errors(value: str) -> list[str]:
    return _pattern_errors(value, 253, _DNS1123_SUBDOMAIN, "a lowercase RFC 1123 subdomain must consist of lower "
                           "case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                           "character", "example.com")


def qualified_name_errors(value: str) -> list[str]:
    parts = value.split("/")
    if len(parts) > 2 or not parts[-1]:
        return ["name part must be non-empty"] if len(parts) <= 2 else [_regex_error(
            "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
            "an alphanumeric character", _QUALIFIED, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"]
    errs = [f"prefix part {e}" for e in dns1123_subdomain_errors(parts[0])] if len(parts) == 2 else []
    if len(parts[-1]) > MAX_LABEL:
        errs.append("name part " + _max_len(MAX_LABEL))
    if not re.fullmatch(_QUALIFIED, parts[-1]):
        errs.append(_regex_error("name part must consist of alphanumeric characters, '-', '_' or '.', and must "
                                 "start and end with an alphanumeric character", _QUALIFIED, "MyName", "my.name",
                                 "123-abc"))
    return errs


def label_value_errors(value: str) -> list[str]:
    errs = [_max_len(MAX_LABEL)] if len(value) > MAX_LABEL else []
    if not re.fullmatch(_LABEL_VALUE, value):
        errs.append(_regex_error("a valid label must be an empty string or consist of alphanumeric characters, "
                                 "'-', '_' or '.', and must start and end with an alphanumeric character",
                                 _LABEL_VALUE, "MyValue", "my_value", "12345"))
    return errs


# ------------------------------------------------------------------ errors


@dataclass(frozen=True)
class Cause:
    """One field error, worded as apimachinery words it: ``FIELD: TYPE: VALUE: DETAIL``. A
    cause with no ``reason`` is a plain message (KServe's webhook answers with those)."""

    field: str
    reason: str
    detail: str = ""
    value: Any = _OMIT
    rule: str = ""  # the CEL rule or the operator's rule it comes from, for the library's message

    def body(self) -> str:
        if not self.reason:
            return self.detail
        text = _TYPES.get(self.reason, self.reason)
        if self.value is not _OMIT and self.reason not in ("FieldValueRequired", "FieldValueForbidden",
                                                           "FieldValueTooLong", "InternalError"):
            text += f": {_shown(self.value)}"
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}" if self.field else self.body()


def _shown(value: Any) -> str:
    """A bad value as apimachinery prints it: strings quoted, numbers and booleans bare
    (a structure, which Go prints as a Go literal, as JSON)."""
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    return json.dumps(value, sort_keys=True)


def _aggregate(items: list[str]) -> str:
    unique = list(dict.fromkeys(items))
    return unique[0] if len(unique) == 1 else "[" + ", ".join(unique) + "]"


class AdmissionError(ConfigError):
    """The cluster refuses the object (``code`` 400, 422 or 403), or (``code`` 0) would
    accept it but its operator could not create what it needs."""

    def __init__(self, obj: dict[str, Any], causes: list[Cause], code: int, webhook: str = ""):
        self.kind = str(obj.get("kind") or "")
        api = str(obj.get("apiVersion") or "")
        self.group, _, self.version = api.rpartition("/")
        self.name = str((obj.get("metadata") or {}).get("name") or "")
        self.causes, self.code, self.webhook = list(causes), code, webhook
        super().__init__(self._text([f"{c} (rule: {c.rule})" if c.rule else str(c) for c in self.causes]))

    def _text(self, causes: list[str]) -> str:
        if self.code == 400:  # the decoder lists its errors plainly
            return self._head() + ", ".join(causes)
        return self._head() + _aggregate(causes)

    def _head(self) -> str:
        if self.code == 400:
            return f"{self.kind} in version \"{self.version}\" cannot be handled as a {self.kind}: " \
                   "strict decoding error: "
        if self.code == 403:
            return f"admission webhook \"{self.webhook}\" denied the request: "
        if self.code == 422:
            return f"{self.kind}.{self.group} \"{self.name}\" is invalid: "
        return f"{self.kind} \"{self.name}\" would be accepted but cannot run: "

    @property
    def message(self) -> str:
        """The Status message, as the API server words it."""
        return self._text([str(c) for c in self.causes])

    def status(self) -> dict[str, Any]:
        """The API server's answer: a ``v1 Status`` (its HTTP code is ``code``)."""
        reason = {400: "BadRequest", 403: "Forbidden", 422: "Invalid"}.get(self.code, "Invalid")
        out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": self.message, "reason": reason}
        if self.code == 422:
            out["details"] = {"name": self.name, "group": self.group, "kind": self.kind,
                              "causes": [{"reason": c.reason, "message": c.body(), "field": c.field}
                                         for c in self.causes]}
        out["code"] = self.code or 422
        return out


# ------------------------------------------------------------------ 1-2: decoding, ObjectMeta, schema


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _metadata_causes(meta: Any) -> list[Cause]:
    """apimachinery's ObjectMeta validation of a namespaced custom resource."""
    if not isinstance(meta, dict):
        return [Cause("metadata", "FieldValueTypeInvalid", "metadata in body must be of type object", "object")]
    out = []
    name = meta.get("name") or ""
    if not name and not meta.get("generateName"):
        out.append(Cause("metadata.name", "FieldValueRequired", "name or generateName is required"))
    out += [Cause("metadata.name", "FieldValueInvalid", m, name) for m in (dns1123_subdomain_errors(name)
                                                                          if name else [])]
    if meta.get("namespace"):
        out += [Cause("metadata.namespace", "FieldValueInvalid", m, meta["namespace"])
                for m in _dns1123_label_errors(meta["namespace"])]
    for key, value in (meta.get("labels") or {}).items():
        out += [Cause("metadata.labels", "FieldValueInvalid", m, key) for m in qualified_name_errors(str(key))]
        out += [Cause("metadata.labels", "FieldValueInvalid", m, value) for m in label_value_errors(str(value))]
    for key in meta.get("annotations") or {}:
        out += [Cause("metadata.annotations", "FieldValueInvalid", m, key)
                for m in qualified_name_errors(str(key).lower())]
    return out


def _schema_cause(e: Any) -> Cause:
    """One jsonschema error, worded as the API server's OpenAPI validation words it."""
    where, v, arg = _path(e.absolute_path), e.instance, e.validator_value
    kind = e.validator
    if kind == "required":
        missing = next((k for k in arg if isinstance(v, dict) and k not in v), arg[0])
        return Cause(_path([*e.absolute_path, missing]), "FieldValueRequired")
    if kind == "type":
        actual = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
                  dict: "object", type(None): "null"}.get(type(v), "object")
        want = arg if isinstance(arg, str) else ",".join(arg)
        return Cause(where, "FieldValueTypeInvalid", f"{where} in body must be of type {want}: \"{actual}\"", actual)
    if kind == "enum":
        return Cause(where, "FieldValueNotSupported", "supported values: " + ", ".join(json.dumps(a) for a in arg), v)
    if kind in ("minimum", "maximum"):
        side = "greater" if kind == "minimum" else "less"
        return Cause(where, "FieldValueInvalid", f"{where} in body should be {side} than or equal to {arg}", v)
    if kind == "maxLength":
        return Cause(where, "FieldValueTooLong", f"may not be more than {arg} bytes", v)
    if kind == "minLength":
        return Cause(where, "FieldValueInvalid", f"{where} in body should be at least {arg} chars long", v)
    if kind == "pattern":
        return Cause(where, "FieldValueInvalid", f"{where} in body should match '{arg}'", v)
    if kind == "maxItems":
        return Cause(where, "FieldValueTooMany", f"must have at most {arg} items", len(v))
    if kind == "minItems":
        return Cause(where, "FieldValueInvalid", f"{where} in body should have at least {arg} items", v)
    return Cause(where, "FieldValueInvalid", e.message, v if not isinstance(v, (dict, list)) else _OMIT)


def _schema_errors(obj: dict[str, Any], schema: dict[str, Any] | None, meta_fields: set[str]) -> tuple[
        list[tuple[str, dict, str]], list[Cause]]:
    """What decoding and the OpenAPI schema find in ``obj``: its unknown fields, as
    ``(path, the mapping holding it, key)``, and the causes of the schema's other errors."""
    unknown, causes = [], []
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        unknown += [(f"metadata.{k}", meta, k) for k in meta if k not in meta_fields]
    if schema is not None:
        from mtnlg.cluster.schema import strict_validator

        for e in strict_validator(schema).iter_errors(obj):
            if e.validator == "additionalProperties" and e.validator_value is False and isinstance(e.instance, dict):
                known = set(e.schema.get("properties") or {})
                unknown += [(_path([*e.absolute_path, k]), e.instance, k) for k in e.instance if k not in known]
            else:
                causes.append(_schema_cause(e))
    causes.sort(key=lambda c: c.field)
    return sorted(unknown, key=lambda u: u[0]), causes


# ------------------------------------------------------------------ 3: the operators' webhooks


def _trainjob_name_causes(name: str) -> list[Cause]:
    """The TrainJob CRD's own name rules (x-kubernetes-validations at its root)."""
    out = []
    rule = "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    if not re.fullmatch(_DNS1035, name):
        out.append(Cause("metadata.name", "FieldValueInvalid", "metadata.name must match RFC 1035 DNS label format",
                         name, rule))
    if len(name) > MAX_LABEL:
        out.append(Cause("metadata.name", "FieldValueInvalid", "metadata.name must be no more than 63 characters",
                         name, "size(self.metadata.name) <= 63"))
    return out


def _pytorchjob_name_causes(name: str) -> list[Cause]:
    errs = dns1035_label_errors(name)
    return [Cause("metadata.name", "FieldValueInvalid", "should match: " + ",".join(errs), name,
                  "Training Operator webhook: the name is a DNS-1035 label")] if errs else []


def _isvc_name_causes(name: str) -> list[Cause]:
    if re.fullmatch(_DNS1035, name):
        return []
    return [Cause("", "", f"the InferenceService \"{name}\" is invalid: a InferenceService name must consist of "
                          "lower case alphanumeric characters or '-', and must start with alphabetical character. "
                          f"(e.g. \"my-name\" or \"abc-123\", regex used for validation is '{_DNS1035}')",
                  rule=f"KServe webhook: the name matches '{_DNS1035}'")]


def _env_names(container: dict[str, Any]) -> list[str]:
    return [e.get("name") for e in container.get("env") or [] if isinstance(e, dict)]


def _trainjob_webhook(obj: dict[str, Any]) -> list[Cause]:
    spec = obj.get("spec") or {}
    ref = spec.get("runtimeRef") or {}
    group, kind = ref.get("apiGroup") or "trainer.kubeflow.org", ref.get("kind") or "ClusterTrainingRuntime"
    if group != "trainer.kubeflow.org" or kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        return [Cause("", "", f"unsupported runtime: {kind}.{group}")]
    runtime = RUNTIMES.get(ref.get("name") or "")
    out = []
    trainer = spec.get("trainer") or {}
    reserved = sorted(set(_env_names(trainer)) & set(TORCH_RESERVED_ENV))
    if runtime is not None and reserved:  # the torch plugin's rule (the runtime has a torch policy)
        out.append(Cause("spec.trainer.env", "FieldValueInvalid",
                         f"must not have reserved envs, invalid envs configured: [{' '.join(reserved)}]",
                         trainer.get("env"), "Trainer torch plugin: the runtime sets " + ", ".join(TORCH_RESERVED_ENV)))
    patches = spec.get("runtimePatches") or []
    for patch in patches:
        manager = str(patch.get("manager") or "")
        host, _, path = manager.partition("/")
        where = "spec.runtimePatches.manager"
        if not manager:
            out.append(Cause(where, "FieldValueRequired"))
        elif not host or not path:
            out.append(Cause(where, "FieldValueInvalid", "must be a domain-prefixed path (such as \"acme.io/foo\")",
                             manager))
        else:
            out += [Cause(where, "FieldValueInvalid", m, host) for m in dns1123_subdomain_errors(host)]
            if not re.fullmatch(_HTTP_PATH, path):
                out.append(Cause(where, "FieldValueInvalid", _regex_error("Invalid path", _HTTP_PATH), path))
        jobs = ((((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {})
                .get("replicatedJobs") or [])
        for job in jobs if runtime is not None else []:
            rule = "Trainer JobSet plugin: patches name only the runtime's replicated jobs and containers"
            if job.get("name") not in runtime:
                out.append(Cause("spec.runtimePatches", "FieldValueInvalid", "must not have replicated job that "
                                 "doesn't exist in the runtime job template", patches, rule))
                continue
            pod = ((((job.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {})
            for key, what in (("initContainers", "initContainer"), ("containers", "container")):
                for c in pod.get(key) or []:
                    if c.get("name") not in runtime[job["name"]]:
                        out.append(Cause("spec.runtimePatches", "FieldValueInvalid", f"must not have {what} that "
                                         f"doesn't exist in the runtime job {job['name']}", patches, rule))
                    elif key == "containers" and c.get("env") and c["name"] in (
                            "dataset-initializer", "model-initializer", "node"):
                        out.append(Cause("spec.runtimePatches", "FieldValueInvalid", "must not have envs for the "
                                         "dataset-initializer, model-initializer, node containers", patches,
                                         "Trainer JobSet plugin: the trainer's env goes in spec.trainer.env"))
    return out


def _pytorchjob_webhook(obj: dict[str, Any]) -> list[Cause]:
    name = str((obj.get("metadata") or {}).get("name") or "")
    out = _pytorchjob_name_causes(name)
    spec = obj.get("spec") or {}
    managed = (spec.get("runPolicy") or {}).get("managedBy")
    if managed is not None and managed not in ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue"):
        out.append(Cause("spec.runPolicy.managedBy", "FieldValueNotSupported",
                         'supported values: "kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue"', managed))
    replicas = spec.get("pytorchReplicaSpecs")
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in (replicas or {}):
            out.append(Cause("spec.pytorchReplicaSpecs[Worker]", "FieldValueRequired",
                             "must be configured if elastic policy is used"))
        if elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            out.append(Cause("spec.elasticPolicy.nProcPerNode", "FieldValueForbidden",
                             "must not be used with spec.nprocPerNode"))
    if replicas is None:
        out.append(Cause("spec.pytorchReplicaSpecs", "FieldValueRequired", "must be required"))
    for rtype, rspec in sorted((replicas or {}).items()):
        where = f"spec.pytorchReplicaSpecs[{rtype}]"
        containers = ((((rspec or {}).get("template") or {}).get("spec") or {}).get("containers") or [])
        cpath = f"{where}.template.spec.containers"
        if rtype not in ("Master", "Worker"):
            out.append(Cause(where, "FieldValueNotSupported", 'supported values: "Master", "Worker"', rtype))
        if not containers:
            out.append(Cause(cpath, "FieldValueRequired", "must be specified"))
        out += [Cause(f"{cpath}[{i}].image", "FieldValueRequired", "must be required")
                for i, c in enumerate(containers) if not c.get("image")]
        if not any(c.get("name") == "pytorch" for c in containers):
            out.append(Cause(cpath, "FieldValueRequired", "must have at least one container with name pytorch"))
        n = (rspec or {}).get("replicas", 1)  # the defaulting webhook sets 1 when absent
        if rtype == "Master" and n != 1:
            out.append(Cause(f"{where}.replicas", "FieldValueForbidden", "must be 1"))
        elif rtype != "Master" and n < 1:
            out.append(Cause(f"{where}.replicas", "FieldValueForbidden", "must be at least 1"))
    return out


def _isvc_webhook(obj: dict[str, Any]) -> list[Cause]:
    out = _isvc_name_causes(str((obj.get("metadata") or {}).get("name") or ""))
    if out:
        return out  # KServe answers with its first error only
    for part in ("predictor", "transformer", "explainer"):
        comp = (obj.get("spec") or {}).get(part)
        if not isinstance(comp, dict):
            continue
        low, high = comp.get("minReplicas", 1), comp.get("maxReplicas", 0)
        for bad, text in ((low < 0, "'MinReplicas' cannot be less than 0"),
                          (high < 0, "'MaxReplicas' cannot be less than 0"),
                          (low > high and high != 0, "'MinReplicas' cannot be greater than MaxReplicas")):
            if bad:
                return [Cause("", "", text)]
    return []


_WEBHOOK_RULES = {"TrainJob": _trainjob_webhook, "PyTorchJob": _pytorchjob_webhook, "InferenceService": _isvc_webhook}
_WEBHOOK_NAME_RULES = {"PyTorchJob": _pytorchjob_name_causes, "InferenceService": _isvc_name_causes}


# ------------------------------------------------------------------ 4: the children's names


def child_name_causes(kind: str, name: str, *, nodes: int = 1, namespace: str = "") -> list[Cause]:
    """What the operators would fail to create for a ``kind`` named ``name``: the longest
    pod, Service or host label made from it, when it is not a DNS-1035 label of at most 63."""
    if kind == "TrainJob":
        child = f"{name}-{TRAINER_JOB}-0-{max(nodes, 1) - 1}-abcde"  # <jobset>-<job>-<job index>-<pod index>-<5>
        what, why = "its longest pod name", ("JobSet refuses the TrainJob's JobSet (\"JobSet name is too long, pod "
                                             "names generated for this JobSet will exceed 63 characters\")")
    elif kind == "PyTorchJob":
        child = f"{name}-worker-{nodes - 2}" if nodes > 1 else f"{name}-master-0"
        what, why = "its longest pod and Service name", ("the Training Operator cannot create the Service (a "
                                                         "DNS-1035 label of at most 63 characters)")
    elif kind == "InferenceService" and namespace:
        child = f"{name}-predictor-{namespace}"
        what, why = "the first label of the predictor's host name", (
            "KServe's default domainTemplate \"{{ .Name }}-{{ .Namespace }}.{{ .IngressDomain }}\" makes it, and a "
            "DNS label has at most 63 characters")
    elif kind == "InferenceService":
        child = f"{name}-predictor"
        what, why = "KServe's predictor Service", "a Service name is a DNS-1035 label of at most 63 characters"
    else:
        return []
    if len(child) <= MAX_LABEL:  # the name itself passed its own rule: only the length can fail
        return []
    room = MAX_LABEL - (len(child) - len(name))
    return [Cause("metadata.name", "FieldValueInvalid", f"{what} would be \"{child}\" ({len(child)} characters): "
                  f"{why}; a name of at most {room} characters fits", name)]


def _nodes(obj: dict[str, Any]) -> int:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "TrainJob":
        return int((spec.get("trainer") or {}).get("numNodes") or 1)
    if obj.get("kind") == "PyTorchJob":
        reps = spec.get("pytorchReplicaSpecs") or {}
        return 1 + int((reps.get("Worker") or {}).get("replicas", 1) if "Worker" in reps else 0)
    return 1


def check_name(kind: str, name: str, *, nodes: int = 1, namespace: str = "") -> None:
    """The name rules of ``admit`` alone, before the object exists (a config's ``validate``):
    ObjectMeta's, the kind's own, then the names of its children."""
    obj = {"apiVersion": {"TrainJob": "trainer.kubeflow.org/v1alpha1", "PyTorchJob": "kubeflow.org/v1",
                          "InferenceService": "serving.kserve.io/v1beta1"}[kind], "kind": kind,
           "metadata": {"name": name, "namespace": namespace}}
    causes = _metadata_causes(obj["metadata"]) + (_trainjob_name_causes(name) if kind == "TrainJob" else [])
    if causes:
        raise AdmissionError(obj, causes, 422)
    causes = _WEBHOOK_NAME_RULES[kind](name) if kind in _WEBHOOK_NAME_RULES else []
    if causes:
        raise AdmissionError(obj, causes, 403, WEBHOOKS[kind])
    causes = child_name_causes(kind, name, nodes=nodes, namespace=namespace)
    if causes:
        raise AdmissionError(obj, causes, 0)


# ------------------------------------------------------------------ admission


def admit(obj: dict[str, Any], schema: dict[str, Any] | None = None, *, old: dict[str, Any] | None = None,
          preflight: bool = True, field_validation: str = "Strict") -> list[str]:
    """Admit ``obj`` as the cluster would (see the module doc), or raise ``AdmissionError``.

    ``schema``: the CRD's ``openAPIV3Schema`` (``schema.load_crd_schema``); without it the
    schema and CEL stage is the TrainJob name rules alone. ``old``: the stored object, on
    update (transition rules). ``preflight`` (the library's mode): ObjectMeta may hold only
    what a client sets, and the children's names are checked; ``False`` is the API server's
    mode (the test emulator). ``field_validation``: ``Strict`` refuses unknown fields;
    ``Warn``/``Ignore`` drop them from ``obj`` and return them (the API server's warnings).
    The API server drops ``status`` on create and keeps the stored one on update: pass the
    object as it would be stored."""
    from mtnlg.cluster import cel
    from mtnlg.cluster.schema import CLIENT_METADATA

    kind = str(obj.get("kind") or "")
    unknown, causes = _schema_errors(obj, schema, CLIENT_METADATA if preflight else OBJECT_META)
    warnings = []
    if unknown and field_validation == "Strict":
        raise AdmissionError(obj, [Cause("", "", f"unknown field \"{path}\"") for path, _, _ in unknown], 400)
    for path, holder, key in unknown:
        holder.pop(key, None)
        warnings.append(f"unknown field \"{path}\"")
    causes = _metadata_causes(obj.get("metadata")) + causes
    name = str((obj.get("metadata") or {}).get("name") or "")
    if schema is not None:
        if any(c.reason in _BLOCKING for c in causes):
            causes.append(Cause("<nil>", "FieldValueInvalid", "some validation rules were not checked because the "
                                "object was invalid; correct the existing errors to complete validation", None))
        else:
            causes += [Cause(f.path, f.reason, f.message, f.type if f.reason == "FieldValueInvalid" else _OMIT, f.rule)
                       for f in cel.evaluate(schema, obj, old)]
    elif kind == "TrainJob" and name:
        causes += _trainjob_name_causes(name)
    if causes:
        raise AdmissionError(obj, causes, 422)
    if kind in _WEBHOOK_RULES:
        denied = _WEBHOOK_RULES[kind](obj)
        if denied:
            raise AdmissionError(obj, denied, 403, WEBHOOKS[kind])
    if preflight:
        causes = child_name_causes(kind, name, nodes=_nodes(obj), namespace=(obj.get("metadata") or {}).get(
            "namespace") or "")
        if causes:
            raise AdmissionError(obj, causes, 0)
    return warnings
