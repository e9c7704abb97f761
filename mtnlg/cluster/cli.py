"""``mtnlg pytorchjob``: write (and optionally submit) the PyTorchJob for a training run.

    mtnlg pytorchjob --name gpt-1b3 --image REGISTRY/mtnlg-train:0.1.0 --nodes 2 \\
        --nproc-per-node 8 --gpus-per-node 8 --recipe mtnlg-1.3b \\
        data.path=gs://bucket/tokens output=gs://bucket/runs/gpt-1b3 parallel.tp=8 -o job.yaml
    kubectl apply -f job.yaml          # or add --submit
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides")
    p.add_argument("--name", required=True, help="job name (DNS-1123 label)")
    p.add_argument("--image", default=None, help="trainer image (default: the package's mtnlg-train image)")
    p.add_argument("--namespace", default="kubeflow")
    p.add_argument("--recipe", default=None, help="named training recipe")
    p.add_argument("--config", default=None, help="training config YAML (local or gs://)")
    p.add_argument("--nodes", type=int, default=1, help="pods (Master + Workers)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per pod")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpu", default=None, help="CPU limit per pod, e.g. 8")
    p.add_argument("--memory", default=None, help="memory limit per pod, e.g. 64Gi")
    p.add_argument("--schema", default=None, help="PyTorchJob CRD YAML to validate against as well")
    p.add_argument("-o", "--output", default="-", help="where to write the manifests (default stdout)")
    p.add_argument("--submit", action="store_true", help="create the objects with the Kubernetes API and wait")


def main(args: argparse.Namespace) -> int:
    from mtnlg import storage
    from mtnlg.cluster.pytorchjob import (PyTorchJobLauncher, PyTorchJobSpec, build_manifests, load_crd_schema, to_yaml,
                                          validate_pytorchjob)
    from mtnlg.config import to_dict
    from mtnlg.images import TRAIN_IMAGE
    from mtnlg.parallel.dims import ParallelDims
    from mtnlg.config import load_config
    from mtnlg.train.config import TrainRunConfig, recipe

    cfg = load_config(TrainRunConfig, args.config, list(args.overrides), base=recipe(args.recipe))
    spec = PyTorchJobSpec(name=args.name, image=args.image or TRAIN_IMAGE, run_config=to_dict(cfg),
                          namespace=args.namespace, nodes=args.nodes, nproc_per_node=args.nproc_per_node,
                          gpus_per_node=args.gpus_per_node, cpu=args.cpu, memory=args.memory)
    # The layout must fit the job's world size before anything reaches the cluster.
    ParallelDims.build(cfg.parallel, spec.world_size, cfg.model)
    manifests = build_manifests(spec)
    if args.schema:
        validate_pytorchjob(manifests[-1], load_crd_schema(args.schema))
    text = to_yaml(manifests)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        storage.write_text(args.output, text)
        print(args.output)
    if args.submit:
        launcher = PyTorchJobLauncher()
        name = launcher.submit(manifests)
        state = launcher.wait(name, args.namespace)
        print(f"PyTorchJob {args.namespace}/{name}: {state}")
        return 0 if state == "Succeeded" else 1
    return 0
