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
    p.add_argument("--cpu", default="", help="CPU request and limit per node (default 8 per GPU; 4 on CPU nodes)")
    p.add_argument("--memory", default="", help="memory request and limit per node (default 64Gi per GPU; 16Gi)")
    p.add_argument("--ephemeral-storage", default="",
                   help="local disk request and limit per node (default 100Gi with GPUs, 20Gi without)")
    p.add_argument("--queue-name", default="",
                   help="Kueue LocalQueue the job waits in (label kueue.x-k8s.io/queue-name)")
    p.add_argument("--priority-class", default="",
                   help="Kueue WorkloadPriorityClass of the job (label kueue.x-k8s.io/priority-class)")
    p.add_argument("--nccl-socket-ifname", default="", help="NCCL_SOCKET_IFNAME on every node, e.g. eth0")
    p.add_argument("--nccl-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an NCCL (or libfabric FI_*, OFI_NCCL_*, UCX_*) variable on every node; repeatable")
    p.add_argument("--rdma-resource", default="",
                   help="RDMA devices each node asks for, e.g. rdma/ib or vpc.amazonaws.com/efa (adds CAP_IPC_LOCK)")
    p.add_argument("--rdma-per-node", type=int, default=1, help="how many of --rdma-resource per node (default 1)")
    p.add_argument("--host-network", action="store_true",
                   help="PyTorchJob: pods on the node's network (needs the privileged Pod Security level)")
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

    from mtnlg.config import ConfigError

    nccl_env = {}
    for item in args.nccl_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--nccl-env: expected NAME=VALUE, got {item!r}")
        nccl_env[key] = value
    base = {"backend": args.backend, "name": args.name, "namespace": args.namespace, "nodes": args.nodes,
            "gpus_per_node": args.gpus_per_node, "nproc_per_node": args.nproc_per_node, "image": args.image,
            "cpu": args.cpu, "memory": args.memory, "ephemeral_storage": args.ephemeral_storage,
            "runtime": args.runtime, "volume_claim": args.volume_claim, "volume_mount": args.volume_mount,
            "queue_name": args.queue_name, "priority_class": args.priority_class,
            "nccl_socket_ifname": args.nccl_socket_ifname, "nccl_env": nccl_env,
            "rdma_resource": args.rdma_resource, "rdma_per_node": args.rdma_per_node,
            "host_network": args.host_network}
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
        queued = f" ({outcome.queued_s:.0f}s of them in queue {spec.queue_name})" if outcome.queued_s >= 1 else ""
        print(f"{spec.kind.kind} {outcome.namespace}/{outcome.name}: {outcome.state} in {outcome.seconds:.0f}s{queued}",
              file=sys.stderr)
    return 0
