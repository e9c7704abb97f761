"""PATCH bodies: a JSON merge patch (RFC 7386; also what strategic merge patches become here)
or a JSON patch (RFC 6902)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .resources import unprocessable


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, ``None`` deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise unprocessable(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list[Mapping[str, Any]]) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)

    def parent(parts: list[str]) -> tuple[Any, str]:
        cur = doc
        for part in parts[:-1]:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        return cur, parts[-1]

    def get(parts: list[str]) -> Any:
        cur = doc
        for part in parts:
            cur = cur[int(part)] if isinstance(cur, list) else cur[part]
        return cur

    def remove(parts: list[str]) -> Any:
        container, key = parent(parts)
        return container.pop(int(key)) if isinstance(container, list) else container.pop(key)

    def add(parts: list[str], value: Any) -> None:
        nonlocal doc
        if not parts:
            doc = value
            return
        container, key = parent(parts)
        if isinstance(container, list):
            container.insert(len(container) if key == "-" else int(key), value)
        else:
            container[key] = value

    for op in ops:
        try:
            kind, parts = op["op"], _pointer(op["path"])
            if kind == "add":
                add(parts, copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(parts)
            elif kind == "replace":
                get(parts)  # must exist
                if parts:
                    remove(parts)
                add(parts, copy.deepcopy(op["value"]))
            elif kind in ("move", "copy"):
                value = get(_pointer(op["from"]))
                if kind == "move":
                    remove(_pointer(op["from"]))
                add(parts, copy.deepcopy(value))
            elif kind == "test":
                if get(parts) != op["value"]:
                    raise unprocessable(f"test failed at {op['path']}")
            else:
                raise unprocessable(f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise unprocessable(f"JSON patch {op!r} does not apply: {e!r}") from None
    return doc
