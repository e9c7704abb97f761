"""A generated job's container, run as the operator would run it: the job's own command and
environment on two local "nodes", plus exactly the variables each backend's operator
injects, tensor parallelism across them, training to completion on gs:// (the emulator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from corpus_data import tokenized_dir, whatsnew_paragraphs
from distributed import free_port

from mtnlg import storage
from mtnlg.cluster.jobs import ClusterJobConfig, build_job
from mtnlg.config import load_config
from mtnlg.train.config import TrainRunConfig, recipe

pytestmark = pytest.mark.e2e


def _container(job: dict) -> tuple[list[str], dict[str, str]]:
    """The command and the environment the job gives its training container."""
    if job["kind"] == "TrainJob":
        t = job["spec"]["trainer"]
        return t["command"], {e["name"]: e["value"] for e in t["env"]}
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return c["command"], {e["name"]: e["value"] for e in c["env"]}


def _injected(backend: str, node: int, nodes: int, procs: int, port: int) -> dict[str, str]:
    """What Trainer v2's torch runtime / the Training Operator set on node ``node``."""
    env = {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(procs), "PET_NODE_RANK": str(node),
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    if backend == "pytorchjob":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nodes * procs), RANK=str(node))
    return env


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_the_job_container_trains_across_two_nodes(backend, tmp_path, gcs):
    docs = whatsnew_paragraphs(max_files=20)
    local = tokenized_dir(tmp_path / "data", docs[:-40], docs[-40:], vocab_size=384)
    storage.copy_tree(local, f"{gcs}/tokens")
    cfg = load_config(TrainRunConfig, None, [f"data.path={gcs}/tokens", f"output={gcs}/run", "parallel.tp=2",
                                             "train.steps=3", "train.eval_iters=1", "train.log_every=1"],
                      base=recipe("debug"))
    job = build_job(ClusterJobConfig(name="gpt", backend=backend, nodes=2, gpus_per_node=0), cfg)
    command, env = _container(job)
    assert command[0] == "torchrun"
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    procs = []
    for node in range(2):
        node_env = {**os.environ, **env, **_injected(backend, node, nodes=2, procs=1, port=port),
                    "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([os.path.join(bin_dir, command[0]), *command[1:]], env=node_env,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outs)
    summary = json.loads(storage.read_text(f"{gcs}/run/summary.json"))
    assert summary["steps"] == 3 and summary["world_size"] == 2 and summary["layout"]["tp"] == 2
    assert summary["stopped"] == "completed" and summary["final_loss"] < summary["first_loss"] + 1.0
    assert storage.exists(f"{gcs}/run/checkpoints/latest")


def test_the_train_step_launches_a_trainjob_that_really_trains(tmp_path, gcs, monkeypatch):
    """``steps.train_job_step`` end to end: the launcher creates the TrainJob through the
    Kubernetes API (the emulator); a test-side operator runs its container on two local
    "nodes" and reports the outcome; the step returns the run's summary."""
    import threading

    from kube_emulator import TRAINJOBS, KubeEmulator

    from mtnlg.steps import train_job_step

    docs = whatsnew_paragraphs(max_files=20)
    local = tokenized_dir(tmp_path / "data", docs[:-40], docs[-40:], vocab_size=384)
    storage.copy_tree(local, f"{gcs}/tokens")
    cfg = load_config(TrainRunConfig, None, ["parallel.tp=2", "train.steps=2", "train.eval_iters=0"],
                      base=recipe("debug"))
    with KubeEmulator() as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig", namespace="team-a")))

        def operator(event, job):
            name = job["metadata"]["name"]
            kube.set_condition(*TRAINJOBS, "team-a", name, "Created")

            def run_nodes():
                command, env = _container(job)
                bin_dir = os.path.dirname(sys.executable)
                port = free_port()
                procs = [subprocess.Popen(
                    [os.path.join(bin_dir, command[0]), *command[1:]], cwd=tmp_path, stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT, env={**os.environ, **env, **_injected("trainjob", n, 2, 1, port),
                                                   "OMP_NUM_THREADS": "1"}) for n in range(2)]
                kube.set_condition(*TRAINJOBS, "team-a", name, "Running")
                ok = all(p.wait(timeout=300) == 0 for p in procs)
                kube.set_condition(*TRAINJOBS, "team-a", name, "Complete" if ok else "Failed",
                                   reason="JobSucceeded" if ok else "NodeFailed")

            threading.Thread(target=run_nodes, daemon=True).start()

        kube.on(*TRAINJOBS, operator)
        job = ClusterJobConfig(backend="trainjob", namespace="team-a", nodes=2, gpus_per_node=0)
        result = train_job_step(f"{gcs}/tokens", f"{gcs}/run", cfg, job=job, run_id="run-42", timeout_s=300)
        created = [r for r in kube.requests if r.method == "POST" and "trainjobs" in str(r.url)]
    assert result.output == f"{gcs}/run" and result.stats["steps"] == 2 and result.stats["world_size"] == 2
    assert result.metrics()["layout.tp"] == 2
    assert len(created) == 1
