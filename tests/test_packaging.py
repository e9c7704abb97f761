"""The package as a user gets it: the sdist and the wheel built from the checkout
(``python -m build``, the wheel from the sdist, as PyPI users and the images get it) hold
every module and data file of the library and the kfp side, and their metadata is valid."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
# checkout folder -> the package it installs as (setup.py's package_dir)
SOURCES = {"mtnlg": "mtnlg", "components": "mtnlg/components", "pipelines": "mtnlg/pipelines"}


def shipped_files() -> dict[str, str]:
    """Every file of the checkout that the installed package must hold: checkout path ->
    path inside the wheel. Tracked and untracked-but-not-ignored files, as git sees them."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *SOURCES],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = {}
    for rel in out:
        if not (ROOT / rel).is_file():  # deleted in the work tree, not yet in the index
            continue
        top, _, rest = rel.partition("/")
        files[rel] = f"{SOURCES[top]}/{rest}"
    return files


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """``python -m build`` of a copy of the checkout: sdist first, then the wheel from the
    sdist (build's default). No isolation: the build backend is the venv's setuptools, so the
    test needs no network."""
    src = tmp_path_factory.mktemp("src")
    for rel in subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.split():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_the_wheel_holds_every_module_and_data_file(dist):
    wheel = _one(dist, "mtnlg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = shipped_files()
    assert "mtnlg/plan/hardware.py" in want.values() and "mtnlg/recipes/debug.yaml" in want.values()
    missing = sorted(rel for rel, inside in want.items() if inside not in names)
    assert not missing, f"not in {wheel.name}: {missing}"
    # and nothing from outside the package (tests, benchmarks, a top-level components package)
    stray = sorted(n for n in names if not n.startswith(("mtnlg/", "mtnlg-")))
    assert not stray, stray
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mtnlg = mtnlg.cli:run" in zipfile.ZipFile(wheel).read(entry).decode()


def test_the_sdist_holds_every_source_file(dist):
    sdist = _one(dist, "mtnlg-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(rel for rel in [*shipped_files(), "pyproject.toml", "setup.py", "README.md"] if rel not in names)
    assert not missing, f"not in {sdist.name}: {missing}"


def test_the_metadata_is_valid(dist):
    r = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, sorted(dist.iterdir()))],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("PASSED") == 2, r.stdout


def test_a_module_added_to_a_new_room_ships_without_editing_the_build(tmp_path, monkeypatch):
    """Discovery, not a list: a new subpackage of mtnlg (and of the kfp side) is found."""
    import importlib.util

    import setuptools

    for d in ("mtnlg/newroom/inner", "components", "pipelines/sub"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "__init__.py").write_text("")
    for d in ("mtnlg", "mtnlg/newroom"):
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "mtnlg" / "data_only").mkdir()  # no __init__.py: data, not a package
    calls = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: calls.update(kw))
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("mtnlg_setup", ROOT / "setup.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert sorted(calls["packages"]) == ["mtnlg", "mtnlg.components", "mtnlg.newroom", "mtnlg.newroom.inner",
                                         "mtnlg.pipelines", "mtnlg.pipelines.sub"]
    assert calls["package_dir"] == {"mtnlg": "mtnlg", "mtnlg.components": "components",
                                    "mtnlg.pipelines": "pipelines"}
