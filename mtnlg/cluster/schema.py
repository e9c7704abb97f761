"""Strict validation of generated Kubernetes objects against CustomResourceDefinition schemas.

A plain JSON-Schema check of a CRD's ``openAPIV3Schema`` accepts unknown fields, which a
real API server then prunes without a word (a misspelt ``nprocPerNod`` would simply vanish,
and the job would run with the default). So the schema is made strict first, as the API
server's structural-schema rules make it: every object with declared ``properties`` and no
``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields`` rejects other keys;
``x-kubernetes-int-or-string`` accepts an integer or a string. ``metadata`` (not described
by CRD schemas) is checked against the ObjectMeta fields a client may set.

    schema = load_crd_schema("../shared/schemas/kubeflow.org_pytorchjobs.yaml")
    validate_object(job, schema)          # ConfigError naming the path and the field
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from mtnlg.config import ConfigError

# the ObjectMeta fields a client sets (the API server sets the others)
CLIENT_METADATA = {"name", "generateName", "namespace", "labels", "annotations", "ownerReferences", "finalizers"}
_VALIDATORS: dict[int, tuple[dict, Any]] = {}  # id(schema) -> (schema, its strict validator)


@functools.lru_cache(maxsize=16)
def _read_crd(path: str) -> dict[str, Any]:
    # CRDs run to megabytes: libyaml's safe loader when PyYAML has it (10x the pure-Python one)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 - a safe loader


def load_crd_schema(path: str | Path, version: str | None = None) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of a CRD file: of ``version``, else of the storage version
    (read once per file; do not modify the result)."""
    versions = _read_crd(str(Path(path).resolve()))["spec"]["versions"]
    chosen = [v for v in versions if (v["name"] == version if version else v.get("storage"))]
    if not chosen:
        raise ValueError(f"{path}: no version {version or '(storage)'} among {[v['name'] for v in versions]}")
    return chosen[0]["schema"]["openAPIV3Schema"]


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema that rejects what the API server would prune (see the module doc)."""
    def conv(node: Any) -> Any:
        if isinstance(node, list):
            return [conv(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: conv(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out

    out = conv(copy.deepcopy(schema))
    # ObjectMeta is not in CRD schemas: checked by check_metadata instead.
    out.setdefault("properties", {})["metadata"] = {"type": "object"}
    return out


def check_metadata(metadata: Any, where: str = "metadata") -> None:
    """The ObjectMeta fields a client sets: known keys, then the API server's rules for the
    name, namespace, labels and annotations (``admission``, the one implementation)."""
    from mtnlg.cluster.admission import _metadata_causes

    if not isinstance(metadata, dict):
        raise ConfigError(f"{where}: expected a mapping, got {metadata!r}")
    unknown = sorted(set(metadata) - CLIENT_METADATA)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (the API server would drop it)")
    for key, value in (metadata.get("annotations") or {}).items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}.annotations.{key}: expected a string, got {value!r}")
    causes = _metadata_causes(metadata)
    if causes:
        raise ConfigError("; ".join(str(c) for c in causes))


def strict_validator(schema: dict[str, Any]) -> Any:
    """A ``jsonschema`` validator of :func:`strict_schema` (built once per schema)."""
    import jsonschema

    validator = _VALIDATORS.get(id(schema))
    if validator is None or validator[0] is not schema:
        validator = (schema, jsonschema.Draft7Validator(strict_schema(schema)))
        _VALIDATORS[id(schema)] = validator
    return validator[1]


def validate_object(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the first path where ``obj`` breaks the strict schema."""
    check_metadata(obj.get("metadata"))
    validator = strict_validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "<root>"
        kind = obj.get("kind", "object")
        raise ConfigError(f"{kind} does not match the CRD schema at {where}: {e.message}")
