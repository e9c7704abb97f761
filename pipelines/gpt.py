"""The mtnlg pipeline: raw text -> extract -> tokenize -> train -> fuse -> evaluate, one kfp v2 DAG.

The same definition is compiled for Kubeflow (``mtnlg compile``) and run locally through
``kfp.local`` (``mtnlg run``).
"""

from kfp import dsl
from mtnlg.components.evaluate import evaluate
from mtnlg.components.extract import extract
from mtnlg.components.fuse import fuse
from mtnlg.components.tokenize import tokenize
from mtnlg.components.train import train

PIPELINE_NAME = "mtnlg-gpt"


@dsl.pipeline(name=PIPELINE_NAME,
              description="Train a Megatron-Turing-NLG-style GPT from raw text: extract, tokenize, train, fuse, evaluate.")
def gpt_pipeline(
    inputs: list = ["gs://YOUR-BUCKET/raw/"],
    extract_overrides: list = [],
    extract_workers: int = 2,
    beam_args: list = [],
    tokenize_overrides: list = [],
    recipe: str = "debug",
    train_overrides: list = ["parallel.tp=2"],
    nproc: int = 2,
    fuse_overrides: list = [],
    evaluate_overrides: list = [],
):
    """Raw text to an evaluated model. Each ``*_overrides`` list holds ``key=value``
    settings of that step's typed config (ExtractConfig, TokenizeConfig, the training
    recipe's TrainRunConfig, FuseConfig, EvaluateConfig), checked when the step starts."""
    ext = extract(inputs=inputs, overrides=extract_overrides, workers=extract_workers, beam_args=beam_args)
    ext.set_display_name("extract (Beam)")
    tok = tokenize(extracted=ext.outputs["dataset"], overrides=tokenize_overrides)
    tok.set_display_name("tokenize (SentencePiece)")
    trn = train(tokens=tok.outputs["tokens"], recipe=recipe, overrides=train_overrides, nproc=nproc)
    trn.set_display_name("train (GPT, TP/SP/PP/DP)")
    fus = fuse(checkpoint=trn.outputs["checkpoint"], overrides=fuse_overrides)
    fus.set_display_name("fuse (safetensors, Hugging Face)")
    ev = evaluate(model=fus.outputs["model"], tokens=tok.outputs["tokens"], checkpoint=trn.outputs["checkpoint"],
                  overrides=evaluate_overrides)
    ev.set_display_name("evaluate (perplexity, last-word accuracy, samples)")
