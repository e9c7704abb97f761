"""A CustomResourceDefinition's validation rules (``x-kubernetes-validations``, CEL),
evaluated as the Kubernetes API server evaluates them, with cel-python (``celpy``).

    check_rules(schema)                        # every rule compiles, or RuleCompileError naming each one
    for f in evaluate(schema, job):            # the rules a new object breaks
        print(f.path, f.message)               # "<nil>" "metadata.name must match RFC 1035 DNS label format"
    evaluate(schema, new, old)                 # an update: transition rules (``oldSelf``) too

What the API server does, and this does too:

* a rule runs at its place in the schema with ``self`` bound to the value there; where the
  value is absent (or null) the rule does not run;
* a transition rule (one that names ``oldSelf``) runs on update only, where the old value
  exists at the same place: object properties, map keys, and the items of
  ``x-kubernetes-list-type: map`` lists matched by their keys. With ``optionalOldSelf: true``
  it also runs on create, ``oldSelf`` being an empty optional (``hasValue()``, ``value()``,
  ``orValue(default)``);
* on update a rule is not run again on a value that did not change (validation ratcheting);
* at the root ``self.metadata`` holds only ``name`` and ``generateName``; integers, numbers,
  int-or-string, ``date-time`` and ``duration`` strings take their CEL types from the schema;
* the message is ``messageExpression``'s string when it evaluates to a non-empty one, else
  ``message``, else ``failed rule: RULE``; ``fieldPath`` (relative to the rule's place) and
  ``reason`` are honoured; a rule that cannot be evaluated (a missing key, a wrong type)
  fails with ``ERROR evaluating rule: MESSAGE``.

Compiling is celpy's parse plus a check of every function, macro and variable a rule names
against what celpy implements and the Kubernetes functions added here, so a rule that uses
a function nobody implements fails to compile instead of being skipped. Kubernetes adds
libraries to standard CEL (strings, lists, regex ``find``, ``isURL``/``url``, quantities,
``format`` ...); of those, the CRDs validated in this project use none today (their rules
use ``matches``, ``size``, ``has``, ``in``, ``all``/``exists``/``filter``), so none is
added, only the optional type that ``optionalOldSelf`` needs. Not emulated: the cost budget
and the compile-time type check (a rule that does not yield a bool fails when it runs).
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from typing import Any

_MACROS = {"all", "exists", "exists_one", "map", "filter"}
_SPECIAL = {"has", "dyn"}
_VARIABLES = {"self", "oldSelf"}
_OLD_SELF = re.compile(r"\boldSelf\b")
_ROOT_METADATA = ("name", "generateName")


class RuleCompileError(ValueError):
    """One or more rules of a schema do not compile (each named with its place)."""


@dataclass(frozen=True)
class RuleFailure:
    """A rule the object breaks: where (a field path as the API server writes it, ``<nil>``
    at the root), the schema type of the value there, the reason and the message."""

    path: str
    type: str
    reason: str
    message: str
    rule: str


class _Absent:
    """No old value at a place (a create, or a place the update does not correlate); bound
    to ``oldSelf`` of an ``optionalOldSelf`` rule, the empty optional."""

    def __repr__(self) -> str:
        return "optional.none()"


_NONE = _Absent()


def _optional_has_value(opt: Any) -> Any:
    from celpy import celtypes

    return celtypes.BoolType(opt is not _NONE)


def _optional_value(opt: Any) -> Any:
    if opt is _NONE:
        raise ValueError("optional.none() dereference")
    return opt


def _optional_or_value(opt: Any, default: Any) -> Any:
    return default if opt is _NONE else opt


# Kubernetes CEL functions celpy lacks, implemented for the rules we evaluate.
FUNCTIONS = {"hasValue": _optional_has_value, "value": _optional_value, "orValue": _optional_or_value}


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import celpy

    limit = sys.getrecursionlimit()
    env = celpy.Environment()
    sys.setrecursionlimit(max(limit, sys.getrecursionlimit()))  # celpy sets 2500; never lower it
    return env


def _known_functions() -> set[str]:
    from celpy.evaluation import base_functions

    return set(base_functions) | set(FUNCTIONS) | _MACROS | _SPECIAL


def _check_names(tree: Any) -> list[str]:
    """The functions, macros and variables ``tree`` names that nothing implements."""
    from lark import Tree

    known, bound, used, bad = _known_functions(), set(), [], []
    for node in tree.iter_subtrees():
        if node.data == "member_dot_arg":
            name = str(node.children[1])
            if name not in known:
                bad.append(f"function {name}()")
            if name in _MACROS and len(node.children) > 2 and isinstance(node.children[2], Tree):
                var = next(node.children[2].children[0].find_data("ident"), None)
                if var is not None:
                    bound.add(str(var.children[0]))
        elif node.data == "ident_arg":
            if str(node.children[0]) not in known:
                bad.append(f"function {node.children[0]}()")
        elif node.data == "ident":
            used.append(str(node.children[0]))
        elif node.data in ("dot_ident", "dot_ident_arg", "member_object"):
            bad.append(f"{node.data} expressions")
    bad += [f"variable {v}" for v in used if v not in _VARIABLES | bound]
    return sorted(set(bad))


@functools.cache
def compile_rule(text: str) -> Any:
    """A celpy program for ``text`` (cached by text); ``RuleCompileError`` when it does not
    parse or names a function, macro or variable nothing implements."""
    import celpy

    env = _environment()
    try:
        tree = env.compile(text)
    except celpy.CELParseError as e:
        at = str(e).splitlines()[1:2]  # celpy marks the column with a caret under the text
        col = f" at column {len(at[0]) - len(at[0].lstrip()) + 1}" if at and at[0].strip() == "^" else ""
        raise RuleCompileError(f"{text!r} does not parse{col}") from None
    bad = _check_names(tree)
    if bad:
        raise RuleCompileError(f"{text!r} uses {', '.join(bad)}, which no CEL library here implements")
    return env.program(tree, functions=FUNCTIONS)


def rules_of(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every ``(place, rule)`` of a schema, ``place`` like ``.spec.trainer`` or ``.spec.items[]``."""
    out = [(path or "<root>", r) for r in schema.get("x-kubernetes-validations") or []]
    for name, sub in (schema.get("properties") or {}).items():
        out += rules_of(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += rules_of(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += rules_of(schema["additionalProperties"], f"{path}{{}}")
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            out += rules_of(sub, path)
    return out


_CHECKED: dict[int, dict[str, Any]] = {}  # id(schema) -> schema whose rules all compiled


def check_rules(schema: dict[str, Any]) -> int:
    """Compile every rule (and message expression) of ``schema``; the number of rules.
    ``RuleCompileError`` lists each one that does not compile, with its place."""
    rules = rules_of(schema)
    if _CHECKED.get(id(schema)) is schema:
        return len(rules)
    errors = []
    for place, rule in rules:
        for text in filter(None, (rule.get("rule"), rule.get("messageExpression"))):
            try:
                compile_rule(text)
            except RuleCompileError as e:
                errors.append(f"{place}: {e}")
    if errors:
        raise RuleCompileError(f"{len(errors)} validation rule(s) do not compile:\n  " + "\n  ".join(errors))
    _CHECKED[id(schema)] = schema
    return len(rules)


# ----------------------------------------------------------------------------- values


def to_cel(value: Any, schema: dict[str, Any] | None, root: bool = False) -> Any:
    """``value`` (JSON data) as the CEL value the API server binds, typed by ``schema``."""
    from celpy import celtypes

    schema = schema or {}
    if value is None:
        return None
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.DoubleType(value) if schema.get("type") == "number" else celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        fmt = schema.get("format")
        try:
            if fmt == "date-time":
                return celtypes.TimestampType(value)
            if fmt == "duration":
                return celtypes.DurationType(value)
        except (ValueError, TypeError):
            pass
        return celtypes.StringType(value)
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items")) for v in value])
    props = schema.get("properties") or {}
    extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
    out = {}
    for k, v in value.items():
        if root and k == "metadata" and isinstance(v, dict):
            v = {m: v[m] for m in _ROOT_METADATA if m in v}
        out[celtypes.StringType(k)] = to_cel(v, props.get(k, extra))
    return celtypes.MapType(out)


def _schema_type(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    return schema.get("type") or "object"


# ----------------------------------------------------------------------------- evaluation


def _field(path: str, child: str | int, kind: str) -> str:
    """A child's field path as the API server writes it: ``a.b``, ``a[0]``, ``a[key]``."""
    if kind in ("index", "key"):
        return f"{path}[{child}]"
    return f"{path}.{child}" if path else str(child)


def _error_text(err: Exception) -> str:
    """A celpy error, worded as cel-go words it."""
    text = str(err.args[0]) if err.args else str(err)
    m = re.search(r"no such member in mapping: '([^']*)'", text) or re.search(r"KeyError\(\(?'([^']*)'", text)
    if m:
        return f"no such key: {m.group(1)}"
    if "undeclared reference" in text:
        return text.split(" (in activation")[0]
    return text.split("\n")[0]


def _run(program: Any, self_value: Any, old_value: Any) -> Any:
    import celpy

    try:
        return program.evaluate({"self": self_value, "oldSelf": old_value})
    except celpy.CELEvalError as e:
        return e
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
        return celpy.CELEvalError(str(e))


def _message(rule: dict[str, Any], self_value: Any, old_value: Any) -> str:
    expr = rule.get("messageExpression")
    if expr:
        got = _run(compile_rule(expr), self_value, old_value)
        if isinstance(got, str) and got.strip():  # celpy's string concatenation yields a plain str
            return str(got)
    return rule.get("message") or f"failed rule: {rule['rule']}"


def _evaluate_rules(schema: dict[str, Any], value: Any, old: Any, path: str, root: bool,
                    out: list[RuleFailure]) -> None:
    from celpy import celtypes

    rules = schema.get("x-kubernetes-validations") or []
    if not rules:
        return
    self_value = to_cel(value, schema, root)
    old_value = None if old is _NONE else to_cel(old, schema, root)
    for rule in rules:
        transition = bool(_OLD_SELF.search(rule["rule"]))
        if transition and old is _NONE and not rule.get("optionalOldSelf"):
            continue  # a transition rule does not run on create
        if not transition and old is not _NONE and old == value:
            continue  # ratcheting: an unchanged value is not checked again
        got = _run(compile_rule(rule["rule"]), self_value, _NONE if old is _NONE else old_value)
        if isinstance(got, celtypes.BoolType) and bool(got):
            continue
        where, kind = path or "<nil>", _schema_type(schema)
        if isinstance(got, Exception):
            message = f"{_error_text(got)} evaluating rule: {rule.get('message') or rule['rule']}"
            out.append(RuleFailure(where, kind, "FieldValueInvalid", message, rule["rule"]))
        elif not isinstance(got, celtypes.BoolType):
            out.append(RuleFailure(where, kind, "FieldValueInvalid", f"rule did not evaluate to a bool: {rule['rule']}",
                                   rule["rule"]))
        else:
            if rule.get("fieldPath"):  # relative to the rule's place: ".spec.x", ".items[0]"
                where = (path + rule["fieldPath"]).lstrip(".")
            out.append(RuleFailure(where, kind, rule.get("reason") or "FieldValueInvalid",
                                   _message(rule, self_value, old_value), rule["rule"]))


def _list_keys(schema: dict[str, Any], item: Any) -> tuple | None:
    keys = schema.get("x-kubernetes-list-map-keys") or []
    return tuple(item.get(k) for k in keys) if isinstance(item, dict) and keys else None


def _walk(schema: dict[str, Any], value: Any, old: Any, path: str, root: bool, out: list[RuleFailure]) -> None:
    if value is None:
        return
    _evaluate_rules(schema, value, old, path, root, out)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        for key, child in value.items():
            sub = props.get(key, extra)
            if sub is None or (root and key == "metadata"):
                continue
            old_child = old.get(key, _NONE) if isinstance(old, dict) else _NONE
            _walk(sub, child, old_child, _field(path, key, "prop" if key in props else "key"), False, out)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        old_by_key = {}
        if schema.get("x-kubernetes-list-type") == "map" and isinstance(old, list):
            old_by_key = {_list_keys(schema, o): o for o in old}
        for i, child in enumerate(value):
            key = _list_keys(schema, child) if old_by_key else None
            _walk(items, child, old_by_key.get(key, _NONE) if key is not None else _NONE,
                  _field(path, i, "index"), False, out)


def evaluate(schema: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[RuleFailure]:
    """The rules of ``schema`` that ``obj`` breaks (``old``: the stored object, on update).
    Compiles every rule first: ``RuleCompileError`` rather than a rule skipped."""
    check_rules(schema)
    out: list[RuleFailure] = []
    _walk(schema, obj, _NONE if old is None else old, "", True, out)
    return out
