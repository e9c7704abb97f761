"""``mtnlg submit``: upload the compiled pipeline to Kubeflow Pipelines and start a run or a
recurring run (what CI calls to retrain).

    mtnlg submit --host https://kfp.example.com --experiment retrain \\
        --param inputs='["gs://b/raw/"]' --param nodes=4 --wait

The pipeline is compiled now (``--train-backend``, default trainjob) unless ``--package``
names a compiled file, then uploaded as a new version of the pipeline ``--pipeline-name``
(created on first use), named by the package version and the git commit
(``0.1.0-3f2c9ab``; ``GITHUB_SHA`` or ``git rev-parse`` tells the commit). ``--param k=v``
sets pipeline parameters (values read as YAML: ``nodes=4``, ``inputs=[gs://b/raw/]``);
``--run FILE`` reads them from a run file kept in the repository, with the training config
whose text travels as the ``train_config`` parameter (``manifests/retrain.yaml``).
Authentication: ``--token`` or ``KF_PIPELINES_TOKEN`` (a bearer token, e.g. a service
account's), else the kfp client's own defaults (kubeconfig, in-cluster). ``--wait`` follows
the run and exits non-zero with the failed task's name when it fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

FINAL_OK = ("SUCCEEDED",)
FINAL_BAD = ("FAILED", "CANCELED", "SKIPPED")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                   help="Kubeflow Pipelines API endpoint (default $KF_PIPELINES_ENDPOINT)")
    p.add_argument("--token", default=os.environ.get("KF_PIPELINES_TOKEN"),
                   help="bearer token (default $KF_PIPELINES_TOKEN; else kubeconfig / in-cluster)")
    p.add_argument("--namespace", default="kubeflow", help="the user's namespace on multi-user Kubeflow")
    p.add_argument("--experiment", default="mtnlg", help="experiment of the run (created when missing)")
    p.add_argument("--pipeline-name", default="mtnlg-gpt", help="pipeline the version is uploaded under")
    p.add_argument("--train-backend", default=None, choices=("pod", "trainjob", "pytorchjob"),
                   help="training backend of the pipeline compiled now (default: --run's, else trainjob)")
    p.add_argument("--run", default=None, metavar="FILE",
                   help="a run file (YAML: parameters, train_config, train_backend) kept in the repository: what CI "
                        "retrains with; --param entries win over its parameters")
    p.add_argument("--package", default=None, help="a compiled pipeline YAML (default: compile now)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="pipeline parameter")
    p.add_argument("--run-name", default=None, help="run name (default: mtnlg-<version>-<time>)")
    p.add_argument("--recurring", default=None, metavar="CRON",
                   help="create a recurring run on this cron schedule (6 fields, seconds first) instead")
    p.add_argument("--wait", action="store_true", help="follow the run to its end; non-zero exit when it fails")
    p.add_argument("--timeout", type=int, default=7 * 24 * 3600, help="with --wait: seconds (default a week)")
    p.add_argument("--poll", type=float, default=30.0, help="with --wait: seconds between checks")


def git_commit(cwd: str | None = None) -> str:
    sha = os.environ.get("GITHUB_SHA") or os.environ.get("CI_COMMIT_SHA")
    if not sha:
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                 check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            sha = ""
    return sha[:7] or "nogit"


def version_name() -> str:
    from mtnlg import __version__

    return f"{__version__}-{git_commit()}"


def parse_params(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


RUN_FILE_KEYS = ("parameters", "train_config", "train_backend")


def read_run_file(path: str) -> dict:
    """A run file: ``parameters`` (pipeline parameters), ``train_config`` (the path, relative
    to the file, of a run config or recipe whose text becomes the ``train_config`` parameter,
    so a config changed in the repository reaches the run without a new image) and
    ``train_backend``. Unknown keys and wrong types are refused, naming the file."""
    import yaml

    from mtnlg.config import ConfigError

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with {', '.join(RUN_FILE_KEYS)}")
    unknown = sorted(set(data) - set(RUN_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(RUN_FILE_KEYS)}")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: parameters: expected a mapping of pipeline parameters")
    out = {"parameters": dict(params)}
    if data.get("train_backend"):
        out["train_backend"] = str(data["train_backend"])
    if data.get("train_config"):
        if "train_config" in params:
            raise ConfigError(f"{path}: train_config is given both as a file and in parameters")
        config = os.path.join(os.path.dirname(os.path.abspath(path)), str(data["train_config"]))
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{path}: train_config: {config} does not exist")
        with open(config, encoding="utf-8") as f:
            out["parameters"]["train_config"] = f.read()
    return out


def _pipeline_params(package: str) -> set[str]:
    return set(_pipeline_defaults(package))


def _pipeline_defaults(package: str) -> dict:
    """``{parameter: default}`` of a compiled pipeline (integers as ints)."""
    import yaml

    with open(package, encoding="utf-8") as f:
        ir = yaml.safe_load(f)
    out = {}
    for name, spec in ir["root"]["inputDefinitions"]["parameters"].items():
        value = spec.get("defaultValue")
        if spec.get("parameterType") == "NUMBER_INTEGER" and isinstance(value, float) and value.is_integer():
            value = int(value)
        out[name] = value
    return out


def failed_tasks(run) -> list[str]:
    """Names of the run's tasks that failed (the pipeline itself excluded)."""
    details = getattr(getattr(run, "run_details", None), "task_details", None) or []
    return [t.display_name for t in details if str(t.state).upper() == "FAILED" and t.display_name
            and not str(t.display_name).startswith(("mtnlg-gpt", "root"))]


def _version_names(client, pipeline_id: str) -> set[str]:
    """Every version name of the pipeline, page by page."""
    names, token = set(), ""
    while True:
        page = client.list_pipeline_versions(pipeline_id, page_token=token, page_size=100)
        names |= {v.display_name for v in (page.pipeline_versions or [])}
        token = page.next_page_token or ""
        if not token:
            return names


def submit(args: argparse.Namespace, client=None) -> int:
    import kfp

    if not args.host and client is None:
        raise ValueError("--host: the Kubeflow Pipelines endpoint is required (or set KF_PIPELINES_ENDPOINT)")
    run_file = read_run_file(args.run) if args.run else {}
    params = {**run_file.get("parameters", {}), **parse_params(args.param)}
    backend = args.train_backend or run_file.get("train_backend") or "trainjob"
    with tempfile.TemporaryDirectory(prefix="mtnlg-submit-") as tmp:
        package = args.package
        if package is None:
            from mtnlg.pipelines.compile import compile_pipeline

            package = compile_pipeline(os.path.join(tmp, "pipeline.yaml"), backend)
        unknown = sorted(set(params) - _pipeline_params(package))
        if unknown:
            raise ValueError(f"--param {unknown[0]}: not a parameter of the pipeline; known: "
                             f"{', '.join(sorted(_pipeline_params(package)))}")
        from mtnlg.pipelines.checks import check_parameters

        check_parameters({**_pipeline_defaults(package), **params},  # before anything reaches the cluster
                         backend=backend if args.package is None and backend != "pod" else "")
        client = client or kfp.Client(host=args.host, existing_token=args.token, namespace=args.namespace)
        version = version_name()
        pipeline_id = client.get_pipeline_id(args.pipeline_name)
        if pipeline_id is None:
            pipeline = client.upload_pipeline(package, pipeline_name=args.pipeline_name,
                                              description="mtnlg: raw text to an evaluated GPT",
                                              namespace=None)
            pipeline_id = pipeline.pipeline_id
            versions = client.list_pipeline_versions(pipeline_id, page_size=1).pipeline_versions or []
            version_id = versions[0].pipeline_version_id
            print(f"pipeline {args.pipeline_name} created ({pipeline_id})", file=sys.stderr)
        else:
            name = version
            if name in _version_names(client, pipeline_id):
                name = f"{version}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            v = client.upload_pipeline_version(package, pipeline_version_name=name, pipeline_id=pipeline_id)
            version_id = v.pipeline_version_id
            print(f"pipeline {args.pipeline_name} version {name} uploaded ({version_id})", file=sys.stderr)
    experiment = client.create_experiment(args.experiment, namespace=args.namespace)
    run_name = args.run_name or f"mtnlg-{version}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if args.recurring:
        rec = client.create_recurring_run(experiment.experiment_id, run_name, cron_expression=args.recurring,
                                          params=params, pipeline_id=pipeline_id, version_id=version_id,
                                          max_concurrency=1, no_catchup=True)
        print(f"recurring run {run_name} ({rec.recurring_run_id}): {args.recurring}")
        return 0
    run = client.run_pipeline(experiment.experiment_id, run_name, params=params, pipeline_id=pipeline_id,
                              version_id=version_id)
    print(f"run {run_name} ({run.run_id}) started")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        run = client.get_run(run.run_id)
        state = str(run.state).upper()
        if state in FINAL_OK:
            print(f"run {run_name}: {state}")
            return 0
        if state in FINAL_BAD:
            tasks = failed_tasks(run)
            print(f"run {run_name}: {state}" + (f" in task {', '.join(tasks)}" if tasks else ""), file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            print(f"run {run_name}: still {state} after {args.timeout}s", file=sys.stderr)
            return 1
        time.sleep(args.poll)


def main(args: argparse.Namespace) -> int:
    return submit(args)
