"""The mtnlg pipeline: raw text -> extract -> tokenize -> train -> fuse -> evaluate [-> deploy], one kfp v2 DAG.

The same definition is compiled for Kubeflow (``mtnlg compile``) and run locally through
``kfp.local`` (``mtnlg run``). Where training runs is chosen when the pipeline is compiled
(kfp.local cannot run a runtime branch over artifacts), by ``pipeline_for(train_backend)``:

* ``pod``: torchrun inside the train step's own pod, on one node; the task requests
  ``gpus`` accelerators of type ``accelerator`` (pipeline parameters). What ``mtnlg run`` runs.
* ``trainjob`` / ``pytorchjob``: the train step is a launcher that creates a Kubeflow
  Trainer TrainJob (or a Training Operator PyTorchJob) of ``nodes`` x ``gpus_per_node``
  processes and follows it to its end (docs/kubeflow.md).

``pipeline_for(..., deploy=True)`` adds a deploy step: a KServe InferenceService for the
fused model, created or updated only when the evaluation passes a gate, and optionally
registered in the Kubeflow Model Registry.
"""

import math

from kfp import dsl
from mtnlg.components.deploy import deploy as deploy_step
from mtnlg.components.evaluate import evaluate
from mtnlg.components.extract import extract
from mtnlg.components.fuse import fuse
from mtnlg.components.tokenize import tokenize
from mtnlg.components.train import train
from mtnlg.components.train_job import train as train_job

PIPELINE_NAME = "mtnlg-gpt"
DESCRIPTION = "Train a Megatron-Turing-NLG-style GPT from raw text: extract, tokenize, train, fuse, evaluate."
TRAIN_BACKENDS = ("pod", "trainjob", "pytorchjob")
TRAIN_RETRIES = 2  # a retried train step resumes from its latest checkpoint (and adopts its job)


def model_memory(recipe_name: str, copies: float) -> str:
    """A memory size for a step that holds ``copies`` fp32 copies of the recipe's model (fuse:
    the checkpoint's tensors, the fused ones and the verification model; evaluate: the model
    and its activations), plus 1 GiB for the interpreter and libraries; at least 2Gi."""
    from mtnlg.config import load_config
    from mtnlg.model.flops import count_parameters
    from mtnlg.train.config import TrainRunConfig, recipe

    params = count_parameters(load_config(TrainRunConfig, base=recipe(recipe_name)).model)
    return f"{max(2, math.ceil(params * 4 * copies / 2**30) + 1)}Gi"


# Kubeflow Pipelines' own artifact store, while a pipeline that reaches it over S3 is built
# (pipeline_for(kfp_store_endpoint=...)): (endpoint, Secret with its keys)
_KFP_STORE: tuple[str, str] | None = None


def resources(task, cpu, memory):
    """CPU and memory requests equal to the limits (the Guaranteed QoS class: a step is
    neither throttled below nor evicted above what it asked for), from pipeline parameters;
    and, in a pipeline built to reach Kubeflow Pipelines' store over S3, its endpoint and keys."""
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    if _KFP_STORE is not None:
        from kfp import kubernetes

        from mtnlg.cluster.jobs import KFP_STORE_KEYS

        endpoint, secret = _KFP_STORE
        task.set_env_variable("AWS_ENDPOINT_URL_S3", endpoint).set_env_variable("MTNLG_S3_SECRET", secret)
        kubernetes.use_secret_as_env(task, secret_name=secret,
                                     secret_key_to_env={key: var for var, key in KFP_STORE_KEYS.items()})
    return task


def step_resources(params: dict) -> dict:
    """The ``<step>_cpu`` and ``<step>_memory`` parameters among a pipeline's ``params``."""
    return {k: v for k, v in params.items() if k.endswith(("_cpu", "_memory"))}


def _data_steps(inputs, extract_overrides, extract_workers, beam_args, vocab_size, tokenize_overrides, res):
    ext = extract(inputs=inputs, overrides=extract_overrides, workers=extract_workers, beam_args=beam_args)
    resources(ext, res["extract_cpu"], res["extract_memory"])
    ext.set_display_name("extract (Beam)")
    # The inputs are URIs whose content can change under the same name: a cached extract
    # would skip new data, so it always runs (the later steps are cached on its output).
    ext.set_caching_options(False)
    tok = tokenize(extracted=ext.outputs["dataset"], vocab_size=vocab_size, overrides=tokenize_overrides)
    resources(tok, res["tokenize_cpu"], res["tokenize_memory"])
    tok.set_display_name("tokenize (SentencePiece)")
    return tok


def _model_steps(tok, trn, fuse_overrides, evaluate_overrides, res, deploy=None):
    trn.set_display_name("train (GPT, TP/SP/PP/DP)")
    resources(trn, res["train_cpu"], res["train_memory"])
    trn.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2.0)
    fus = fuse(checkpoint=trn.outputs["checkpoint"], overrides=fuse_overrides)
    resources(fus, res["fuse_cpu"], res["fuse_memory"])
    fus.set_display_name("fuse (safetensors, Hugging Face)")
    ev = evaluate(model=fus.outputs["model"], tokens=tok.outputs["tokens"], checkpoint=trn.outputs["checkpoint"],
                  overrides=evaluate_overrides)
    resources(ev, res["evaluate_cpu"], res["evaluate_memory"])
    ev.set_display_name("evaluate (perplexity, last-word accuracy, samples)")
    if deploy is not None:  # (name, overrides, registry_overrides), when compiled with deploy
        name, overrides, registry_overrides = deploy
        dep = deploy_step(model=fus.outputs["model"], report=ev.outputs["report"], name=name, overrides=overrides,
                          registry_overrides=registry_overrides, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        resources(dep, "250m", "512Mi")  # a Kubernetes and registry client
        dep.set_display_name("deploy (KServe, gated on the evaluation)")
        dep.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0)


# fuse and evaluate memory, sized by the default recipe's model (pod: debug; jobs: mtnlg-1.3b)
POD_FUSE_MEMORY, POD_EVALUATE_MEMORY = model_memory("debug", 3), model_memory("debug", 2)
JOB_FUSE_MEMORY, JOB_EVALUATE_MEMORY = model_memory("mtnlg-1.3b", 3), model_memory("mtnlg-1.3b", 2)


def _pod_pipeline(deploy: bool = False):
    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION + (" Then deploy on KServe." if deploy else ""))
    def gpt_pipeline(
        inputs: list = ["gs://YOUR-BUCKET/raw/"],
        extract_overrides: list = [],
        extract_workers: int = 2,
        beam_args: list = [],
        vocab_size: int = 0,
        tokenize_overrides: list = [],
        recipe: str = "debug",
        model_preset: str = "",
        num_layers: int = 0,
        hidden_size: int = 0,
        num_heads: int = 0,
        seq_length: int = 0,
        tp: int = 2,
        pp: int = 0,
        steps: int = 0,
        global_batch_size: int = 0,
        train_overrides: list = [],
        train_config: str = "",
        nproc: int = 2,
        gpus: int = 0,
        accelerator: str = "nvidia.com/gpu",
        fuse_overrides: list = [],
        evaluate_overrides: list = [],
        deploy_name: str = "mtnlg-gpt",
        deploy_overrides: list = [],
        registry_overrides: list = [],
        extract_cpu: str = "2",
        extract_memory: str = "8Gi",
        tokenize_cpu: str = "2",
        tokenize_memory: str = "8Gi",
        train_cpu: str = "4",
        train_memory: str = "16Gi",
        fuse_cpu: str = "2",
        fuse_memory: str = POD_FUSE_MEMORY,
        evaluate_cpu: str = "2",
        evaluate_memory: str = POD_EVALUATE_MEMORY,
    ):
        """Raw text to an evaluated model, training in the train step's own pod. The named
        training parameters (``model_preset``, sizes, ``tp``, ``pp``, ``steps``, ...; 0 or ""
        keeps the recipe's) go over the ``recipe``; each ``*_overrides`` list holds ``key=value``
        settings of that step's typed config (ExtractConfig, TokenizeConfig, TrainRunConfig,
        FuseConfig, EvaluateConfig), applied last and checked when the step starts. ``gpus``
        accelerators of type ``accelerator`` are requested for the train step (``nproc``
        processes: one per GPU). The deploy parameters take effect in a pipeline compiled with
        a deploy step (``mtnlg compile --deploy``): DeployConfig and RegistryConfig settings."""
        res = step_resources(locals())
        tok = _data_steps(inputs, extract_overrides, extract_workers, beam_args, vocab_size, tokenize_overrides, res)
        trn = train(tokens=tok.outputs["tokens"], recipe=recipe, model_preset=model_preset, num_layers=num_layers,
                    hidden_size=hidden_size, num_heads=num_heads, seq_length=seq_length, tp=tp, pp=pp, steps=steps,
                    global_batch_size=global_batch_size, overrides=train_overrides, train_config=train_config,
                    nproc=nproc)
        trn.set_accelerator_type(accelerator).set_accelerator_limit(gpus)
        _model_steps(tok, trn, fuse_overrides, evaluate_overrides, res,
                     (deploy_name, deploy_overrides, registry_overrides) if deploy else None)

    return gpt_pipeline


gpt_pipeline = _pod_pipeline()  # what `mtnlg run` runs (no cluster, so no deploy step)


def parameter_defaults(pipeline=None) -> dict:
    """``{parameter: default}`` of a pipeline function (default: the pod pipeline)."""
    pipeline = pipeline if pipeline is not None else _pod_pipeline()
    return {name: spec.default for name, spec in pipeline.component_spec.inputs.items()}


def _job_pipeline(backend: str, volume_claim: str = "", volume_mount: str = "/mnt/mtnlg", deploy: bool = False):
    @dsl.pipeline(name=PIPELINE_NAME, description=f"{DESCRIPTION} Training runs as a Kubeflow {backend}."
                  + (" Then deploy on KServe." if deploy else ""))
    def gpt_job_pipeline(
        inputs: list = ["gs://YOUR-BUCKET/raw/"],
        extract_overrides: list = [],
        extract_workers: int = 2,
        beam_args: list = [],
        vocab_size: int = 0,
        tokenize_overrides: list = [],
        recipe: str = "mtnlg-1.3b",
        model_preset: str = "",
        num_layers: int = 0,
        hidden_size: int = 0,
        num_heads: int = 0,
        seq_length: int = 0,
        tp: int = 8,
        pp: int = 0,
        steps: int = 0,
        global_batch_size: int = 0,
        train_overrides: list = [],
        train_config: str = "",
        nodes: int = 2,
        gpus_per_node: int = 8,
        job_overrides: list = [],
        queue_name: str = "",
        priority_class: str = "",
        train_timeout_s: int = 0,
        job_cleanup: str = "on-success",
        fuse_overrides: list = [],
        evaluate_overrides: list = [],
        deploy_name: str = "mtnlg-gpt",
        deploy_overrides: list = [],
        registry_overrides: list = [],
        extract_cpu: str = "2",
        extract_memory: str = "8Gi",
        tokenize_cpu: str = "2",
        tokenize_memory: str = "8Gi",
        train_cpu: str = "500m",
        train_memory: str = "1Gi",
        fuse_cpu: str = "4",
        fuse_memory: str = JOB_FUSE_MEMORY,
        evaluate_cpu: str = "4",
        evaluate_memory: str = JOB_EVALUATE_MEMORY,
    ):
        """Raw text to an evaluated model, training as a job of ``nodes`` x ``gpus_per_node``
        processes; ``job_overrides`` are ClusterJobConfig settings (``memory=512Gi``,
        ``image=...``, ``runtime=...``, ``node_selector={...}``, ``volume_claim=...``);
        ``queue_name`` and ``priority_class`` put the job in a Kueue LocalQueue with a
        WorkloadPriorityClass ("" = none). The deploy parameters take effect when compiled with
        a deploy step (``mtnlg compile --deploy``)."""
        res = step_resources(locals())
        tok = _data_steps(inputs, extract_overrides, extract_workers, beam_args, vocab_size, tokenize_overrides, res)
        trn = train_job(tokens=tok.outputs["tokens"], recipe=recipe, model_preset=model_preset, num_layers=num_layers,
                        hidden_size=hidden_size, num_heads=num_heads, seq_length=seq_length, tp=tp, pp=pp,
                        steps=steps, global_batch_size=global_batch_size, overrides=train_overrides,
                        train_config=train_config, backend=backend,
                        nodes=nodes, gpus_per_node=gpus_per_node, job_overrides=job_overrides,
                        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, timeout_s=train_timeout_s, cleanup=job_cleanup,
                        volume_claim=volume_claim, volume_mount=volume_mount, queue_name=queue_name,
                        priority_class=priority_class)
        if volume_claim:  # the launcher stages tokens and the run on the volume the job's nodes share
            from kfp import kubernetes

            kubernetes.mount_pvc(trn, pvc_name=volume_claim, mount_path=volume_mount)
        _model_steps(tok, trn, fuse_overrides, evaluate_overrides, res,
                     (deploy_name, deploy_overrides, registry_overrides) if deploy else None)

    return gpt_job_pipeline


def pipeline_for(train_backend: str = "trainjob", volume_claim: str = "", volume_mount: str = "/mnt/mtnlg",
                 deploy: bool = False, kfp_store_endpoint: str = "", kfp_store_secret: str = ""):
    """The pipeline function for a training backend (see the module doc); with a
    ``volume_claim`` (a ReadWriteMany PVC), the job backends' launcher and nodes mount it at
    ``volume_mount`` and stage there what object storage does not give the nodes. With
    ``deploy``, a last step serves the model on KServe when the evaluation passes the gate.
    With ``kfp_store_endpoint`` (``http://minio-service.kubeflow:9000``), every step reads and
    writes Kubeflow Pipelines' own store (its default pipeline root, ``minio://``) over S3
    with the keys of ``kfp_store_secret``, and so do the training job's pods."""
    global _KFP_STORE
    from mtnlg.cluster.jobs import KFP_STORE_SECRET

    if train_backend not in TRAIN_BACKENDS:
        raise ValueError(f"train backend {train_backend!r}: expected one of {', '.join(TRAIN_BACKENDS)}")
    if kfp_store_endpoint and not kfp_store_endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--kfp-store-endpoint: expected http(s)://HOST:PORT, got {kfp_store_endpoint!r}")
    _KFP_STORE = (kfp_store_endpoint, kfp_store_secret or KFP_STORE_SECRET) if kfp_store_endpoint else None
    try:
        if train_backend == "pod":
            if volume_claim:
                raise ValueError("--volume-claim: only the trainjob and pytorchjob backends use a shared volume")
            return _pod_pipeline(deploy) if deploy or _KFP_STORE else gpt_pipeline
        return _job_pipeline(train_backend, volume_claim, volume_mount, deploy)
    finally:
        _KFP_STORE = None
