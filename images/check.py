"""The image check: each step image's Python environment, assembled the way its Dockerfile
assembles it, runs every pipeline step that names the image.

    python images/check.py                     # every image (what .ci/run runs)
    python images/check.py --image data        # one image
    python images/check.py --work DIR --keep   # keep the environments and the runs' files

No Docker engine runs here or on CI, so the image itself is not built. Its Python
environment is, from the Dockerfile's own lines (its final stage):

* the base image's Python: a bare virtual environment of this machine's Python at the base's
  version, plus what the base brings (``pytorch/pytorch:T``: torch at ``T``'s version, the
  CPU build here; ``python:X-slim``: nothing);
* only the files the Dockerfile COPYs (``.dockerignore`` applied), under its WORKDIR;
* its RUN lines that are pip and python commands, run as written (the package built and
  installed from those files, not editable, with the Dockerfile's constraints and extras;
  its smoke line); its system set-up lines (apt-get, useradd) are listed and not repeated;
* its ENV, with absolute paths moved under the check's folder.

Then, in that environment: ``mtnlg --version``, ``mtnlg --help``, and every kfp component
whose ``base_image`` is this image (found in the installed package, so a new component is
covered, or fails the check, from the day it is added), each run by kfp's executor on tiny
real inputs (``images/check_steps.py``): extract and tokenize in the data image; train,
train_job (a TrainJob on the Kubernetes API emulator, whose test-side operator runs the
job's container command with this environment's torchrun on two local "nodes"), fuse,
evaluate with lm-evaluation-harness, and deploy with Model Registry registration (the
emulators) in the train image. Exit status 1 when anything fails.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
TESTS = ROOT / "tests"
PY_WORDS = ("pip", "pip3", "python", "python3")

# What a base image brings, by repository: its Python version from the tag (or fixed), and
# the packages it has installed (``{tag_version}`` is the tag's leading version).
BASES: dict[str, dict] = {
    "python": {"python": r"^(\d+\.\d+)", "packages": []},
    "pytorch/pytorch": {"python": "3.11", "packages": ["torch=={tag_version}"]},
}


@dataclass
class Dockerfile:
    """The final stage of a Dockerfile, as far as a Python environment goes."""

    path: Path
    base: str = ""
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[list[str], str, str]] = field(default_factory=list)  # (sources, dest, workdir)
    runs: list[tuple[str, str, dict]] = field(default_factory=list)  # (command, workdir, env at that point)


def logical_lines(text: str) -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def parse_dockerfile(path: Path) -> Dockerfile:
    stages: list[list[str]] = []
    for line in logical_lines(path.read_text(encoding="utf-8")):
        if line.split(None, 1)[0].upper() == "FROM":
            stages.append([])
        if not stages:
            continue
        stages[-1].append(line)
    if not stages:
        raise ValueError(f"{path}: no FROM")
    d = Dockerfile(path)
    for line in stages[-1]:
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            d.base = rest.split()[0]
        elif word == "WORKDIR":
            d.workdir = rest if rest.startswith("/") else os.path.join(d.workdir, rest)
        elif word == "ENV":
            for tok in shlex.split(rest):
                k, sep, v = tok.partition("=")
                if not sep:
                    raise ValueError(f"{path}: ENV {rest!r}: use KEY=VALUE")
                d.env[k] = v
        elif word == "COPY":
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue  # from another stage: not the Python environment
            args = [a for a in args if not a.startswith("--")]
            d.copies.append((args[:-1], args[-1], d.workdir))
        elif word == "RUN":
            d.runs.append((rest, d.workdir, dict(d.env)))
    return d


def base_environment(base: str) -> tuple[str, list[str]]:
    """(Python version, packages it brings) for a base image reference."""
    ref = base.split("@")[0]
    repo, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "latest")
    if repo not in BASES:
        raise ValueError(f"base image {base!r}: images/check.py does not know what it brings (BASES)")
    spec = BASES[repo]
    m = re.match(spec["python"], tag) if spec["python"].startswith("^") else None
    python = m.group(1) if m else spec["python"]
    version = re.match(r"^(\d+(\.\d+)*)", tag)
    return python, [p.format(tag_version=version.group(1) if version else tag) for p in spec["packages"]]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        for p in patterns:
            p = p.rstrip("/")
            if fnmatch.fnmatch(sub, p) or (p.startswith("**/") and fnmatch.fnmatch(parts[i - 1], p[3:])):
                return True
    return False


def command_words(command: str) -> list[str]:
    """The program of each command in a RUN line's ``&&`` / ``;`` chain."""
    return [c.split()[0] for c in re.split(r"&&|;|\|\|", command) if c.split()]


class Check:
    def __init__(self, work: Path, python: str | None):
        self.work = work
        self.python_override = python
        self.results: list[tuple[str, str, bool, float, str]] = []  # image, what, ok, seconds, detail

    def record(self, image: str, what: str, ok: bool, seconds: float, detail: str = "") -> bool:
        self.results.append((image, what, ok, seconds, detail))
        print(f"image check: {image}: {what}: {'ok' if ok else 'FAILED'} ({seconds:.0f} s){' ' + detail if detail else ''}",
              flush=True)
        return ok

    def sh(self, image: str, what: str, cmd: list[str] | str, env: dict, cwd: Path, timeout: float = 1800) -> bool:
        t = time.perf_counter()
        r = subprocess.run(cmd, shell=isinstance(cmd, str), env=env, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout, executable="/bin/bash" if isinstance(cmd, str) else None)
        ok = r.returncode == 0
        if not ok:
            print(f"--- {image}: {what}: exit {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}", flush=True)
        self.record(image, what, ok, time.perf_counter() - t)
        return ok

    # -- the environment ------------------------------------------------------------------

    def assemble(self, name: str, d: Dockerfile) -> tuple[Path, dict] | None:
        top = self.work / name
        fs = top / "fs"  # the image's filesystem: the Dockerfile's absolute paths live under it
        shutil.rmtree(top, ignore_errors=True)
        fs.mkdir(parents=True)
        version, brought = base_environment(d.base)
        python = self.python_override or shutil.which(f"python{version}")
        if not python:
            self.record(name, f"base {d.base}", False, 0, f"no python{version} on this machine")
            return None
        venv = top / "venv"
        t = time.perf_counter()
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        self.record(name, f"base {d.base}: a bare Python {version}", True, time.perf_counter() - t)
        patterns = [p for p in (ROOT / ".dockerignore").read_text().split() if not p.startswith("#")] \
            if (ROOT / ".dockerignore").exists() else []
        for sources, dest, workdir in d.copies:
            target = fs / os.path.join(workdir, dest).lstrip("/")
            for src in sources:
                s = ROOT / src
                if s.is_dir():
                    to = target if (len(sources) == 1 and not dest.endswith("/")) else target / s.name
                    for f in sorted(s.rglob("*")):
                        rel = f.relative_to(ROOT).as_posix()
                        if f.is_file() and not ignored(rel, patterns):
                            (to / f.relative_to(s)).parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(f, to / f.relative_to(s))
                else:
                    to = target / s.name if dest.endswith("/") or len(sources) > 1 else target
                    to.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(s, to)
        env = self.image_env(venv, fs, d.env)
        Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
        if brought and not self.sh(name, f"what the base brings: {' '.join(brought)}",
                                   [str(venv / "bin" / "pip"), "install", "-q", *brought], env, fs):
            return None
        for command, workdir, run_env in d.runs:
            words = command_words(command)
            if not all(w in PY_WORDS for w in words):
                if any(w in PY_WORDS for w in words):
                    self.record(name, f"RUN {command[:60]}", False, 0,
                                "mixes Python and system commands: split it so the check can run its Python half")
                    return None
                self.record(name, f"RUN {' '.join(dict.fromkeys(words))}", True, 0, "(system set-up, not repeated)")
                continue
            cwd = fs / workdir.lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
            if not self.sh(name, f"RUN {command[:100]}", command, self.image_env(venv, fs, run_env), cwd):
                return None
        return venv, env

    @staticmethod
    def image_env(venv: Path, fs: Path, image_env: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "KUBECONFIG"))}
        env.update({k: (str(fs) + v if v.startswith("/") else v) for k, v in image_env.items()})
        env.setdefault("HOME", str(fs / "root"))
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}:{os.environ.get('PATH', '')}"
        env["OMP_NUM_THREADS"] = "1"
        env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        return env

    # -- the steps ------------------------------------------------------------------------

    def steps(self, name: str, venv: Path, env: dict, comps: list[str], settings: dict) -> bool:
        python = str(venv / "bin" / "python")
        ok = self.sh(name, "mtnlg --version", [str(venv / "bin" / "mtnlg"), "--version"], env, self.work)
        ok &= self.sh(name, "mtnlg --help", [str(venv / "bin" / "mtnlg"), "--help"], env, self.work)
        if not comps:
            return ok
        (self.work / "settings.json").write_text(json.dumps(settings))
        ok &= self.sh(name, f"components {', '.join(comps)} (kfp executor, tiny real inputs)",
                      [python, str(IMAGES / "check_steps.py"), "--image", name, "--work", str(self.work),
                       "--state", str(self.work / "artifacts.json"), "--components", ",".join(comps),
                       "--settings", str(self.work / "settings.json")], env, self.work)
        return ok


def component_images() -> dict[str, str]:
    """Component module -> image, read from the checkout's components (check_steps.components)."""
    sys.path.insert(0, str(IMAGES))
    import check_steps

    return {n: check_steps.image_of(c) for n, c in check_steps.components().items()}


def dockerfile_for(image: str) -> Path:
    m = re.search(r"/mtnlg-([a-z0-9-]+):", image)
    path = IMAGES / (m.group(1) if m else "?") / "Dockerfile"
    if not path.exists():
        raise SystemExit(f"image {image}: no Dockerfile at {path}")
    return path


class Emulators:
    """The Kubernetes API emulator with test-side operators (TrainJob: the job's container on
    two local nodes with the image environment's torchrun; InferenceService: Ready), and the
    Model Registry's fake REST server."""

    def __init__(self, work: Path):
        sys.path.insert(0, str(TESTS))
        from kube_emulator import TRAINJOBS, KubeEmulator
        from model_registry_server import FakeModelRegistry

        self.work, self.trainjobs = work, TRAINJOBS
        self.kube = KubeEmulator().start()
        self.kube.declare_resource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")
        self.registry = FakeModelRegistry().__enter__()
        self.kubeconfig = self.kube.write_kubeconfig(work / "kubeconfig", namespace="team-a")
        self.node_env: dict = {}
        self.kube.on(*TRAINJOBS, self._trainjob)
        self.kube.on("serving.kserve.io", "v1beta1", "inferenceservices", self._isvc, events=("ADDED", "MODIFIED"))
        self.seen: set = set()

    def _trainjob(self, event, job):
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        self.kube.set_condition(*self.trainjobs, ns, name, "Created")

        def nodes():
            t = job["spec"]["trainer"]
            command, env = t["command"], {e["name"]: e["value"] for e in t.get("env", []) if "value" in e}
            from distributed import free_port  # tests/distributed.py

            port = free_port()
            bin_dir = Path(self.node_env["VIRTUAL_ENV"]) / "bin"
            procs = [subprocess.Popen(
                [str(bin_dir / command[0]), *command[1:]], cwd=self.work, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
                env={**self.node_env, **env, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(n),
                     "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}) for n in range(2)]
            self.kube.set_condition(*self.trainjobs, ns, name, "Running")
            outs = [p.communicate(timeout=600)[0] for p in procs]
            ok = all(p.returncode == 0 for p in procs)
            if not ok:
                print("--- TrainJob node logs:\n" + "\n---\n".join(o[-4000:] for o in outs), flush=True)
            self.kube.set_condition(*self.trainjobs, ns, name, "Complete" if ok else "Failed",
                                    reason="JobSucceeded" if ok else "NodeFailed")

        threading.Thread(target=nodes, daemon=True).start()

    def _isvc(self, kind, obj):
        meta = obj["metadata"]
        key = (meta["name"], meta.get("generation", 1))
        if key not in self.seen:
            self.seen.add(key)
            self.kube.set_conditions("serving.kserve.io", "v1beta1", "inferenceservices", meta["namespace"],
                                     meta["name"], [{"type": "Ready", "status": "True"}],
                                     observedGeneration=meta.get("generation", 1), url=f"http://{meta['name']}.local")

    def stop(self):
        self.registry.__exit__(None, None, None)
        self.kube.stop()


def quality_classifier(corpus: Path, path: Path) -> Path:
    """A quality classifier file for the extract case (the data image scores with it, so its
    scikit-learn is exercised): the corpus's documents against their words shuffled."""
    import gzip
    import random

    from mtnlg.extract.quality import train_classifier

    good = [gzip.open(f, "rt", encoding="utf-8").read() for f in sorted(corpus.glob("*.txt.gz"))]
    rng = random.Random(0)
    bad = [" ".join(rng.sample(t.split(), len(t.split()))) for t in good]
    train_classifier(good, bad).save(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", action="append", help="check only this image (data, train); repeatable")
    p.add_argument("--work", type=Path, help="where environments and runs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep --work's contents")
    p.add_argument("--python", help="the interpreter to build environments from (default: pythonX.Y of the base)")
    a = p.parse_args(argv)
    work = (a.work or Path(tempfile.mkdtemp(prefix="mtnlg-image-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    by_image: dict[str, list[str]] = {}
    for comp, image in component_images().items():
        by_image.setdefault(str(dockerfile_for(image).parent.name), []).append(comp)
    sys.path.insert(0, str(IMAGES))
    import check_steps

    missing = sorted(c for comps in by_image.values() for c in comps if c not in check_steps.CASES)
    if missing:
        print(f"image check: components without a case in images/check_steps.py CASES: {missing}", file=sys.stderr)
        return 1
    names = sorted(p.parent.name for p in IMAGES.glob("*/Dockerfile"))
    # images whose steps make the inputs of others' run first (data before train)
    names.sort(key=lambda n: min((list(check_steps.CASES).index(c) for c in by_image.get(n, [])), default=99))
    chosen = a.image or names
    check = Check(work, a.python)
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    for f in sorted((ROOT / "data" / "corpus" / "python-docs" / "whatsnew").glob("*.txt.gz")):
        shutil.copy2(f, corpus / f.name)
    shutil.copy2(f, corpus / f"again-{f.name}")  # an exact duplicate for the dedup to drop
    classifier = quality_classifier(corpus, work / "quality_classifier.json")
    emulators = Emulators(work) if any(n in chosen for n in names) else None
    settings = {"corpus": str(corpus), "quality_classifier": str(classifier),
                "volume_mount": str(work / "shared-volume"),
                "registry_url": emulators.registry.url if emulators else ""}
    ok = True
    try:
        for name in chosen:
            d = parse_dockerfile(IMAGES / name / "Dockerfile")
            built = check.assemble(name, d)
            if built is None:
                ok = False
                continue
            venv, env = built
            env["KUBECONFIG"] = str(emulators.kubeconfig)
            env.pop("HOSTNAME", None)  # not a pod: jobs get no owner
            if emulators:
                emulators.node_env = env
            comps = [c for c in check_steps.CASES if c in by_image.get(name, [])]
            ok &= check.steps(name, venv, env, comps, settings)
    finally:
        if emulators:
            emulators.stop()
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    failed = [r for r in check.results if not r[2]]
    print(f"image check: {len(check.results) - len(failed)} of {len(check.results)} checks passed "
          f"in {total:.0f} s (load average {os.getloadavg()[0]:.1f})")
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
