"""The layering of ``mtnlg/`` (docs/architecture.md), checked on the source: every import
runs down the stack or stays in its own room, and only the CLI reaches the kfp side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mtnlg"

# Lowest first. A module may import its own room and any room of a lower floor; rooms on
# one floor are peers and never import each other.
FLOORS: list[set[str]] = [
    {"progress", "process"},                                                    # base ...
    {"storage"},
    {"config", "dist", "images"},                                               # ... base
    {"model"},
    {"parallel"},
    {"formats", "plan"},
    {"extract", "tokenize", "train", "fuse", "generate", "evaluate"},           # the steps' rooms
    {"cluster", "serve"},                                    # launchers; the HTTP server
    {"steps"},
    {"api"},
    {"cli", "__init__"},
]
KFP_SIDE = ("kfp", "mtnlg.components", "mtnlg.pipelines")


def _room(module: str) -> str:
    """``mtnlg.train.trainer`` -> ``train``; ``mtnlg`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _floor(room: str) -> int:
    for i, rooms in enumerate(FLOORS):
        if room in rooms:
            return i
    raise AssertionError(f"room {room!r} is on no floor: add it to FLOORS and docs/architecture.md")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, function-level ones included;
    ``from mtnlg import storage`` counts as ``mtnlg.storage``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mtnlg":
                out += [(node.lineno, f"mtnlg.{a.name}") for a in node.names
                        if (PKG / a.name).exists() or (PKG / f"{a.name}.py").exists()]
            else:
                out.append((node.lineno, node.module))
    return out


def _library_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_stack_is_not_empty():
    files = _library_files()
    assert len(files) > 50 and any(p.name == "trainer.py" for p in files)
    assert sum(len(_imports(p)) for p in files) > 300


def test_imports_run_down_the_stack():
    bad = []
    for path in _library_files():
        me = _module_name(path)
        mine = _room(me)
        for line, target in _imports(path):
            if not target.startswith("mtnlg.") or target.startswith(KFP_SIDE[1:]):
                continue
            theirs = _room(target)
            if theirs == mine:
                continue
            if _floor(theirs) >= _floor(mine):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {me} ({mine}) imports {target} ({theirs})")
    assert not bad, "imports that run up or sideways:\n" + "\n".join(bad)


def test_only_the_cli_reaches_kfp_components_and_pipelines():
    bad = []
    for path in _library_files():
        for line, target in _imports(path):
            if target == "kfp" or target.startswith(("kfp.",) + KFP_SIDE[1:]):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
    assert not bad, "\n".join(bad)


def test_peers_do_not_import_the_trainer():
    for path in _library_files():
        me = _module_name(path)
        if _room(me) in ("fuse", "generate", "evaluate", "model"):
            hits = [t for _, t in _imports(path) if t.startswith("mtnlg.train")]
            assert not hits, f"{me} imports {hits}"


def test_the_checker_sees_a_violation(tmp_path):
    """The rule itself can fail: an upward import in a fake model module is caught."""
    fake = tmp_path / "gpt.py"
    fake.write_text("from mtnlg.train.trainer import Trainer\nfrom mtnlg import storage\n")
    found = _imports(fake)
    assert (1, "mtnlg.train.trainer") in found and (2, "mtnlg.storage") in found
    assert _floor(_room("mtnlg.train.trainer")) > _floor(_room("mtnlg.model.gpt"))


def test_the_trainer_never_branches_on_pipeline_parallelism():
    """``trainer.py`` reads as the loop: the engine hides whether stages exist."""
    tree = ast.parse((PKG / "train" / "trainer.py").read_text(encoding="utf-8"))
    pp_reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("pp", "pp_rank")]
    pipeline_names = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and "pipeline" in n.id.lower()]
    assert not pp_reads and not pipeline_names, (pp_reads, pipeline_names)
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_loop")
    assert any(isinstance(n, ast.While) for n in ast.walk(loop))  # the loop is where it is said to be


MAX_LINES = 600


def test_no_module_is_over_600_lines():
    """A file holds one idea: a module past 600 lines is split into rooms (docs/architecture.md)."""
    long = {str(p.relative_to(ROOT)): n for p in _library_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
