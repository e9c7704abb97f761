"""``mtnlg compile [--train-backend pod|trainjob|pytorchjob] [--deploy] -o FILE``: the pipeline's kfp v2 IR YAML."""

from __future__ import annotations

import argparse

BACKENDS = ("pod", "trainjob", "pytorchjob")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="where to write the IR YAML (local path)")
    p.add_argument("--train-backend", default="trainjob", choices=BACKENDS,
                   help="where the train step trains: a Kubeflow Trainer TrainJob (default), a Training Operator "
                        "PyTorchJob, or torchrun in the step's own pod (one node)")
    p.add_argument("--volume-claim", default="", help="job backends: a ReadWriteMany PVC the launcher and the "
                   "job's nodes mount, for tokens and runs when the pipeline root is not gs:// or s3://")
    p.add_argument("--volume-mount", default="/mnt/mtnlg", help="where that PVC is mounted (default /mnt/mtnlg)")
    p.add_argument("--deploy", action="store_true", help="add a deploy step: serve the model on KServe when the "
                   "evaluation passes the gate (deploy_overrides), optionally register it (registry_overrides)")
    p.add_argument("--kfp-store-endpoint", default="", metavar="URL",
                   help="Kubeflow Pipelines' own artifact store (the default minio:// pipeline root), e.g. "
                        "http://minio-service.kubeflow:9000: every step and the training job's pods read and write it "
                        "over S3 with the keys of --kfp-store-secret")
    p.add_argument("--kfp-store-secret", default="", metavar="NAME",
                   help="the Secret with the store's keys (accesskey, secretkey) in the run's namespace "
                        "(default mlpipeline-minio-artifact)")


def compile_pipeline(path: str, train_backend: str = "trainjob", volume_claim: str = "",
                     volume_mount: str = "/mnt/mtnlg", deploy: bool = False, kfp_store_endpoint: str = "",
                     kfp_store_secret: str = "") -> str:
    from kfp import compiler
    from mtnlg.pipelines.gpt import pipeline_for

    compiler.Compiler().compile(pipeline_for(train_backend, volume_claim, volume_mount, deploy, kfp_store_endpoint,
                                             kfp_store_secret), package_path=path)
    return path


def main(args: argparse.Namespace) -> int:
    print(compile_pipeline(args.output, args.train_backend, args.volume_claim, args.volume_mount, args.deploy,
                           args.kfp_store_endpoint, args.kfp_store_secret))
    return 0
