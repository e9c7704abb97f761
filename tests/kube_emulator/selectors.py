"""Label and field selectors as the API server reads them, on list, watch and delete-collection."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .resources import bad_request


def _split_top(sel: str) -> list[str]:
    """Split a selector at the commas outside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in sel:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SET_TERM = re.compile(rf"^({_KEY})\s+(in|notin)\s+\((.*)\)$")
_EQ_TERM = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)$")
_EXISTS_TERM = re.compile(rf"^(!?)\s*({_KEY})$")
_FIELD_TERM = re.compile(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$")


def _label_predicates(selector: str | None) -> list[Callable[[Mapping[str, str]], bool]]:
    preds: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_top(selector or ""):
        if m := _SET_TERM.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in":
                preds.append(lambda labels, k=key, vs=values: k in labels and labels[k] in vs)
            else:
                preds.append(lambda labels, k=key, vs=values: k not in labels or labels[k] not in vs)
        elif m := _EQ_TERM.match(term):
            key, op, value = m.groups()
            if op == "!=":
                preds.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                preds.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif m := _EXISTS_TERM.match(term):
            neg, key = m.groups()
            preds.append((lambda labels, k=key: k not in labels) if neg else (lambda labels, k=key: k in labels))
        else:
            raise bad_request(f"unable to parse requirement: {term!r} in label selector {selector!r}")
    return preds


def match_labels(labels: Mapping[str, str] | None, selector: str | None) -> bool:
    """Whether ``labels`` match a Kubernetes label ``selector`` (``a=b,c!=d,e in (f,g),!h``)."""
    labels = labels or {}
    return all(p(labels) for p in _label_predicates(selector))


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return ""
        cur = cur[part]
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def _field_predicates(selector: str | None) -> list[Callable[[Mapping[str, Any]], bool]]:
    preds: list[Callable[[Mapping[str, Any]], bool]] = []
    for term in _split_top(selector or ""):
        m = _FIELD_TERM.match(term)
        if not m:
            raise bad_request(f"invalid field selector term {term!r} in {selector!r}")
        path, op, value = m.group(1), m.group(2), m.group(3).strip()
        if op == "!=":
            preds.append(lambda obj, p=path, v=value: _field_value(obj, p) != v)
        else:
            preds.append(lambda obj, p=path, v=value: _field_value(obj, p) == v)
    return preds


def match_fields(obj: Mapping[str, Any], selector: str | None) -> bool:
    """Whether ``obj`` matches a field ``selector`` (``metadata.name=x,status.phase!=Running``)."""
    return all(p(obj) for p in _field_predicates(selector))


class Selector:
    def __init__(self, namespace: str | None, name: str | None, labels: str | None, fields: str | None):
        self.namespace, self.name = namespace, name
        self._labels = _label_predicates(labels)
        self._fields = _field_predicates(fields)

    def __call__(self, obj: Mapping[str, Any]) -> bool:
        md = obj.get("metadata") or {}
        if self.namespace is not None and md.get("namespace") != self.namespace:
            return False
        if self.name is not None and md.get("name") != self.name:
            return False
        labels = md.get("labels") or {}
        return all(p(labels) for p in self._labels) and all(p(obj) for p in self._fields)
