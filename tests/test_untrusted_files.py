"""No pickle from a file is ever trusted: every ``torch.load`` in the package passes
``weights_only=True``, nothing calls ``pickle.load``/``pickle.loads`` or ``torch.load``
without it, no unpickler is built except the allow-listed one for DCP metadata, and no
Hugging Face call sets ``trust_remote_code``. Checked on the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("mtnlg", "components", "pipelines", "benchmarks") for p in (ROOT / d).rglob("*.py")]
ALLOWED_UNPICKLERS = {"_MetadataUnpickler"}  # mtnlg/formats/checkpoint/safe_load.py: an allow-list of DCP classes


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def problems_in(source: str, where: str) -> list[str]:
    out = []
    tree = ast.parse(source, where)
    for node, owner, name in _calls(tree):
        kw = {k.arg: k.value for k in node.keywords}
        line = f"{where}:{node.lineno}"
        if owner == "torch" and name == "load":
            v = kw.get("weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                out.append(f"{line}: torch.load without weights_only=True")
        if owner in ("pickle", "cPickle", "dill", "cloudpickle") and name in ("load", "loads"):
            out.append(f"{line}: {owner}.{name}")
        if "trust_remote_code" in kw:
            v = kw["trust_remote_code"]
            if not (isinstance(v, ast.Constant) and v.value is False):
                out.append(f"{line}: trust_remote_code")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name not in ALLOWED_UNPICKLERS:
            for b in node.bases:
                if isinstance(b, ast.Attribute) and b.attr == "Unpickler":
                    out.append(f"{where}:{node.lineno}: unpickler {node.name} is not allow-listed")
    return out


def test_the_package_loads_no_untrusted_pickle():
    assert len(SOURCES) > 50
    found = [p for path in SOURCES for p in problems_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == []


def test_the_scan_catches_each_unsafe_form():
    bad = """
import pickle, torch
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
pickle.loads(b"")
AutoModel.from_pretrained("m", trust_remote_code=True)
class Mine(pickle.Unpickler):
    pass
"""
    found = problems_in(bad, "bad.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "pickle.loads",
        "trust_remote_code", "unpickler Mine is not allow-listed"]
    assert problems_in('import torch\ntorch.load("x", weights_only=True)\n', "ok.py") == []
