"""``benchmarks/gpu_check.sh --cpu`` keeps working without a GPU: the same sections as on a
GPU, on the small debug model, leaving out only the compiled run (about 50 s of inductor
compilation on 2 cores; ``tests/test_hot_loop.py`` and the trainer's own tests cover the
rest of what it would show). Every section must report no error, the non-logging step must
read nothing back, and resuming must be bitwise; the fp8 section (eager on the CPU, through
torch's CPU float8 matmul) must convert the blocks' layers and follow bf16's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu", "--skip", "train_compiled"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and summary["device"] == "cpu"
    assert summary["gemm"]["tflops"] > 0
    assert summary["train_eager"]["tokens_per_s"] > 0 and summary["syncs_per_step"] == {"train_eager": 0}
    assert summary["wrappers"]["ok"] and summary["resume"]["bitwise"]
    assert "skipped" in summary["fp16"] and summary["sdpa"]["flash"] is False
    fp8 = summary["fp8"]
    assert fp8["bf16"]["float8_layers"] == 0 and fp8["fp8"]["float8_layers"] == 12  # debug: 2 blocks x 6
    assert fp8["fp8"]["tokens_per_s"] > 0 and fp8["speedup"] > 0
    assert len(fp8["fp8"]["losses"]) == fp8["steps"] and fp8["max_loss_difference"] < 0.05
