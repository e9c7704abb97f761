"""``mtnlg job``: write (and optionally run) the TrainJob or PyTorchJob of a training run.

    mtnlg job --backend trainjob --name gpt-1b3 --nodes 2 --gpus-per-node 8 --recipe mtnlg-1.3b \\
        data.path=gs://bucket/tokens output=gs://bucket/runs/gpt-1b3 parallel.tp=8 -o job.yaml
    kubectl apply -f job.yaml          # or add --submit to create it and follow it to its end

The file holds every object the pipeline's launcher would create (today: the one job; the
run config travels inside it), after the same checks: the layout against nodes x GPUs, the
data and run directory reachable from the pods, and admission as the cluster does it
(``mtnlg.cluster.admission``: the name rules, the operator's webhook rules, the names of
the pods the operator will create) and, with ``--schema-dir``, the CRD's schema (unknown
fields rejected) and its CEL validation rules. A refused job is never written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCHEMA_FILES = {"trainjob": "trainer.kubeflow.org_trainjobs.yaml", "pytorchjob": "kubeflow.org_pytorchjobs.yaml"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    p.add_argument("--backend", default="trainjob", choices=("trainjob", "pytorchjob"),
                   help="Kubeflow Trainer v2 TrainJob (default) or Training Operator PyTorchJob")
    p.add_argument("--name", required=True,
                   help="job name: an RFC 1035 label (a-z, 0-9, '-', starting with a letter) short enough for "
                        "the names of the job's pods")
    p.add_argument("--namespace", default="kubeflow")
    p.add_argument("--nodes", type=int, default=1, help="nodes (pods)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one training process each")
    p.add_argument("--nproc-per-node", type=int, default=0, help="processes per node (default: one per GPU)")
    p.add_argument("--image", default="", help="trainer image (default: this package's mtnlg-train image)")
    p.add_argument("--cpu", default="", help="CPU request and limit per node, e.g. 32")
    p.add_argument("--memory", default="", help="memory request and limit per node, e.g. 512Gi")
    p.add_argument("--runtime", default="torch-distributed", help="TrainJob: ClusterTrainingRuntime name")
    p.add_argument("--volume-claim", default="", help="ReadWriteMany PVC mounted on every node")
    p.add_argument("--volume-mount", default="/mnt/mtnlg", help="where the PVC is mounted (default /mnt/mtnlg)")
    p.add_argument("--job", action="append", default=[], metavar="KEY=VALUE", dest="job_overrides",
                   help="any other job setting (ClusterJobConfig), e.g. --job shm_size=32Gi "
                        "--job node_selector={pool: a100}")
    p.add_argument("--recipe", default=None, help="named training recipe")
    p.add_argument("--config", default=None, help="training config YAML (local or gs://)")
    p.add_argument("--schema-dir", default=None,
                   help="folder with the CRD YAML files: admit against their schemas and CEL rules too")
    p.add_argument("-o", "--output", default="-", help="where to write the objects (default stdout)")
    p.add_argument("--submit", action="store_true", help="create the job with the Kubernetes API and follow it")
    p.add_argument("--timeout", type=float, default=None, help="with --submit: seconds to wait at most")
    p.add_argument("--cleanup", default="on-success", choices=("on-success", "on-failure", "always", "never"),
                   help="with --submit: when to delete the job (default on-success)")


def job_config(args: argparse.Namespace):
    from mtnlg.cluster.jobs import ClusterJobConfig
    from mtnlg.config import load_config

    base = {"backend": args.backend, "name": args.name, "namespace": args.namespace, "nodes": args.nodes,
            "gpus_per_node": args.gpus_per_node, "nproc_per_node": args.nproc_per_node, "image": args.image,
            "cpu": args.cpu, "memory": args.memory, "runtime": args.runtime, "volume_claim": args.volume_claim,
            "volume_mount": args.volume_mount}
    return load_config(ClusterJobConfig, overrides=args.job_overrides, base=base)


def main(args: argparse.Namespace) -> int:
    from mtnlg import storage
    from mtnlg.cluster.admission import admit
    from mtnlg.cluster.jobs import build_job, to_yaml
    from mtnlg.cluster.schema import load_crd_schema
    from mtnlg.config import load_config
    from mtnlg.train.config import TrainRunConfig, recipe

    cfg = load_config(TrainRunConfig, args.config, list(args.overrides), base=recipe(args.recipe))
    spec = job_config(args)
    job = build_job(spec, cfg)
    if args.schema_dir:
        path = Path(args.schema_dir) / SCHEMA_FILES[spec.backend]
        if not path.is_file():
            raise FileNotFoundError(f"--schema-dir: {path} not found")
        admit(job, load_crd_schema(path))
    text = to_yaml([job])
    if args.output == "-":
        sys.stdout.write(text)
    else:
        storage.write_text(args.output, text)
        print(args.output, file=sys.stderr)
    if args.submit:
        from mtnlg.cluster.launcher import JobFailed, JobLauncher

        try:
            outcome = JobLauncher(spec.backend).run(job, timeout_s=args.timeout, cleanup=args.cleanup)
        except JobFailed as e:
            print(f"mtnlg job: {e}", file=sys.stderr)
            return 1
        print(f"{spec.kind.kind} {outcome.namespace}/{outcome.name}: {outcome.state} in {outcome.seconds:.0f}s",
              file=sys.stderr)
    return 0
