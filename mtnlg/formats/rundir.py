"""The names of the files and folders that steps write and read, in one place.

A tokenized directory (``mtnlg tokenize``)::

    tokenizer.model  tokenizer.json  train.bin/.idx  validation.bin/.idx  stats.json

A training run directory (``mtnlg train``)::

    config.yaml  log.jsonl  summary.json  loss.png  tensorboard/
    checkpoints/latest  checkpoints/step_00000020/{.metadata, *.distcp, rng/, trainer_state.json,
                                                   config.yaml, tokenizer.model, tokenizer.json}

A fused model directory (``mtnlg fuse``)::

    config.json  model.safetensors (or model-0000i-of-0000n.safetensors + the index)
    tokenizer.model  tokenizer.json  manifest.json  hf/
"""

from __future__ import annotations

# tokenizer (tokenized, checkpoint and fused directories alike)
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_META = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_MODEL, TOKENIZER_META)
STATS_FILE = "stats.json"

# training run
RUN_CONFIG = "config.yaml"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss.png"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"

# one checkpoint
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
RNG_DIR = "rng"
DCP_METADATA = ".metadata"

# fused model
MODEL_CONFIG = "config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MANIFEST = "manifest.json"
HF_DIR = "hf"
# the evaluate step's lm-evaluation-harness task (inside its output)
LM_EVAL_DIR = "lm_eval"
