"""Our held-out cloze items as an lm-evaluation-harness task, and the harness run on them.

    paths = write_lm_eval_task(items, tokenizer, "runs/eval/lm_eval")          # mtnlg_cloze.yaml + .jsonl
    result = run_lm_eval("runs/model/hf", "runs/eval/lm_eval")                  # {"accuracy": ..., ...}

The task is LAMBADA-style, as the harness's own ``lambada_openai``: one JSON line per item
with its ``context`` and ``target`` (the last word, with its leading space), scored with
``output_type: loglikelihood``; its ``acc`` counts an item when greedy decoding would
produce the whole target, which is our evaluator's last-word accuracy. The harness
tokenizes the text itself with the exported Hugging Face tokenizer (which encodes exactly
as ours); a passage that starts a document begins with the end-of-document token's text,
which that tokenizer reads as the token, so both evaluators see the same ids.

From the command line, with the files the evaluate step writes (offline: the data is local)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=runs/model/hf,dtype=float32 \\
        --include_path runs/eval/lm_eval --tasks mtnlg_cloze --batch_size 8

and any standard task (``lambada_openai``, ``hellaswag``, ...) the same way, where its data
can be downloaded or is in the local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mtnlg.evaluate.cloze import ClozeItem

TASK_NAME = "mtnlg_cloze"

_TASK_YAML = """\
# lm-evaluation-harness task written by `mtnlg evaluate`: last-word (LAMBADA-style) items
# from the held-out documents of {data}.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def item_texts(item: ClozeItem, tokenizer) -> tuple[str, str]:
    """``(context, target)`` text of an item as the harness receives it."""
    ids = item.context
    head = ""
    if ids and ids[0] == tokenizer.eod_id:
        head, ids = tokenizer.sp.id_to_piece(tokenizer.eod_id), ids[1:]
    return head + tokenizer.decode(ids), " " + item.word


def write_lm_eval_task(items: list[ClozeItem], tokenizer, out_dir: str, name: str = TASK_NAME,
                       data: str = "the validation split", relative: bool = False) -> dict[str, str]:
    """``OUT_DIR/NAME.yaml`` and ``OUT_DIR/NAME.jsonl`` (a local directory; pass it to the
    harness's ``--include_path``). The YAML names the data file by its absolute path, or
    with ``relative`` by its file name (for a copy that will be moved: the harness then
    has to run from that directory). Returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, f"{name}.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for it in items:
            context, target = item_texts(it, tokenizer)
            f.write(json.dumps({"context": context, "target": target, "doc": it.doc, "start": it.start}) + "\n")
    yaml_path = os.path.join(out_dir, f"{name}.yaml")
    with open(yaml_path, "w", encoding="utf-8") as f:
        where = os.path.basename(jsonl) if relative else os.path.abspath(jsonl)
        f.write(_TASK_YAML.format(name=name, jsonl=json.dumps(where), data=data))
    return {"task": yaml_path, "data": jsonl}


def run_lm_eval(hf_dir: str, task_dir: str, name: str = TASK_NAME, batch_size: int = 8,
                device: str = "cpu", limit: int | None = None) -> dict[str, Any]:
    """Run lm-evaluation-harness (``--model hf``) on the task in ``task_dir``, offline.
    Returns ``{"accuracy", "accuracy_stderr", "perplexity", "items", "version"}``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("run_lm_eval needs lm-evaluation-harness: pip install 'mtnlg[eval]' (lm-eval)") from e
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no Hugging Face model directory (fuse with hf=true writes MODEL/hf)")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=[name],
                                  task_manager=TaskManager(include_path=task_dir), batch_size=batch_size,
                                  device=device, limit=limit, log_samples=False)
    res = out["results"][name]
    n = out.get("n-samples", {}).get(name, {})
    return {"accuracy": float(res["acc,none"]), "accuracy_stderr": float(res.get("acc_stderr,none", float("nan"))),
            "perplexity": float(res["perplexity,none"]), "items": int(n.get("effective", n.get("original", 0))),
            "version": getattr(lm_eval, "__version__", "unknown")}
