"""Published training runs the planner is checked against: each row's model, layout, GPU,
software stack and the figure its authors report (docs/plan.md has the table).

Three sources, eighteen rows. Three are ``fitted=True``: one per GPU kind and software
stack, the row its ``gemm_efficiency`` was fitted on (``mtnlg.plan.hardware``); every other
row is a prediction:

* **MT-NLG**: Smith et al. 2022, "Using DeepSpeed and Megatron to Train Megatron-Turing
  NLG 530B", Table 1 (530B, TP 8 x PP 35, global batch 1920, DGX A100 80 GB; hardware
  TFLOP/s per GPU). DeepSpeed's 1F1B pipeline over Megatron's kernels (no flash
  attention), full recomputation, no sequence parallelism: stack ``megatron-2021``.
* **SC21**: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", Table 1, rows 1.7B to 529.6B (achieved TFLOP/s per GPU on
  Selene's DGX A100 80 GB). Layouts from Megatron-LM's
  ``examples/academic_paper_scripts/sc21/run_table_1.sh`` (TP, PP, micro-batch, global
  batch, layers per virtual stage) and ``CONFIG.sh`` (sequence 2048, fp16); vocabulary
  51,200 (the paper); every row ran with full recomputation (``--activations-checkpoint-method
  uniform``) and Megatron's fused softmax: stack ``megatron-2021``.
* **torchtitan** (pytorch/torchtitan), stack ``torch``: ``docs/performance.md`` (Llama 3 8B
  and 70B, Llama 2 13B and 70B, FSDP2 on 64 A100 80 GB, tokens/s per GPU) and
  ``benchmarks/llama3_h100_202412_torchtitan.md`` Tables 1 and 3 (Llama 3.1 8B, FSDP, local
  batch 2, sequence 8192, selective activation checkpointing, bf16 without torch.compile)
  on Grand Teton hosts: H100 96 GB HBM2e at 500 W (``h100-96g``). The float8 and
  torch.compile rows are left out: the planner models bf16 kernels as they come.
  torchtitan's "selective op" checkpointing is taken as the planner's ``selective``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mtnlg.model.config import ModelConfig
from mtnlg.model.presets import get_preset
from mtnlg.plan.estimate import Estimate, Layout, Workload, estimate
from mtnlg.plan.hardware import get_gpu

# what a run's authors report, and its unit in the table
METRICS = {
    "hardware_tflops_per_gpu": "TFLOP/s/GPU",     # recomputation counted, as the papers count
    "tokens_per_second_per_gpu": "tokens/s/GPU",
    "step_seconds": "s/step",
}


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    model: ModelConfig
    layout: Layout
    global_batch_size: int
    gpu: str
    metric: str          # a key of METRICS
    value: float         # the published figure
    fitted: bool = False
    stack: str = "torch"  # the software stack whose fitted efficiency applies (hardware.STACKS)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"{self.name}: metric {self.metric!r} is not one of {', '.join(METRICS)}")

    def estimate(self) -> Estimate:
        return estimate(self.model, self.layout, Workload(self.global_batch_size, self.model.seq_length),
                        get_gpu(self.gpu, self.stack))

    def predicted(self, e: Estimate | None = None) -> float:
        e = e or self.estimate()
        return {"hardware_tflops_per_gpu": e.hardware_tflops_per_gpu,
                "tokens_per_second_per_gpu": e.tokens_per_second_per_gpu,
                "step_seconds": e.time.total}[self.metric]

    def error(self) -> float:
        """(predicted - published) / published."""
        return self.predicted() / self.value - 1


def _gpt(layers: int, hidden: int, heads: int) -> ModelConfig:
    """A GPT of the SC21 table: Megatron's GPT-2 shape, vocabulary 51,200, sequence 2048."""
    return ModelConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, seq_length=2048,
                       vocab_size=51200, position="learned", norm="layernorm", activation="gelu",
                       tie_embeddings=True, bias=True, dropout=0.1, attention_dropout=0.1)


LLAMA3_8B = ModelConfig(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                        seq_length=8192, vocab_size=128256, position="rotary", norm="rmsnorm",
                        activation="swiglu", tie_embeddings=False, bias=False, rope_theta=500000.0)

LLAMA3_70B = ModelConfig(num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, ffn_hidden_size=28672,
                         seq_length=8192, vocab_size=128256, position="rotary", norm="rmsnorm",
                         activation="swiglu", tie_embeddings=False, bias=False, rope_theta=500000.0)
LLAMA2_13B = ModelConfig(num_layers=40, hidden_size=5120, num_heads=40, ffn_hidden_size=13824, seq_length=4096,
                         vocab_size=32000, position="rotary", norm="rmsnorm", activation="swiglu",
                         tie_embeddings=False, bias=False)
LLAMA2_70B = ModelConfig(num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, ffn_hidden_size=28672,
                         seq_length=4096, vocab_size=32000, position="rotary", norm="rmsnorm",
                         activation="swiglu", tie_embeddings=False, bias=False)

MTNLG = "Smith et al. 2022, Table 1"
SC21 = "Narayanan et al. 2021, Table 1; Megatron-LM sc21/run_table_1.sh"
TITAN = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md"
TITAN_A100 = "torchtitan docs/performance.md"


def _mtnlg(gpus: int, tflops: float, fitted: bool = False) -> PublishedRun:
    lay = Layout(tp=8, pp=35, dp=gpus // 280, activation_checkpoint="full", flash_attention=False,
                 sequence_parallel=False)
    return PublishedRun(f"MT-NLG 530B, {gpus} GPUs", MTNLG, get_preset("mtnlg-530b"), lay, 1920, "a100-80g",
                        "hardware_tflops_per_gpu", tflops, fitted, stack="megatron-2021")


def _sc21(name: str, shape: tuple[int, int, int], tp: int, pp: int, gpus: int, mb: int, batch: int,
          layers_per_virtual: int | None, tflops: float, fitted: bool = False) -> PublishedRun:
    layers = shape[0]
    v = layers // pp // layers_per_virtual if layers_per_virtual else 1
    lay = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), pp_virtual=v, micro_batch_size=mb,
                 activation_checkpoint="full", flash_attention=False, sequence_parallel=False)
    return PublishedRun(f"SC21 {name}, {gpus} GPUs", SC21, _gpt(*shape), lay, batch, "a100-80g",
                        "hardware_tflops_per_gpu", tflops, fitted, stack="megatron-2021")


def _titan(gpus: int, tokens: float, fitted: bool = False) -> PublishedRun:
    lay = Layout(tp=1, pp=1, dp=gpus, micro_batch_size=2, activation_checkpoint="selective", fsdp=True)
    return PublishedRun(f"torchtitan Llama 3.1 8B FSDP, {gpus} GPUs", TITAN, LLAMA3_8B, lay, 2 * gpus,
                        "h100-96g", "tokens_per_second_per_gpu", tokens, fitted)


def _titan_a100(name: str, model: ModelConfig, local_batch: int, recompute: str, tokens: float,
                fitted: bool = False) -> PublishedRun:
    lay = Layout(tp=1, pp=1, dp=64, micro_batch_size=local_batch, activation_checkpoint=recompute, fsdp=True)
    return PublishedRun(f"torchtitan {name} FSDP, 64 GPUs", TITAN_A100, model, lay, 64 * local_batch, "a100-80g",
                        "tokens_per_second_per_gpu", tokens, fitted)


RUNS: tuple[PublishedRun, ...] = (
    _mtnlg(2240, 126.0),
    _mtnlg(2800, 121.0),
    _mtnlg(3360, 113.0),
    #     name     (layers, hidden, heads)  tp  pp  GPUs  mb  batch  layers/virtual  TFLOP/s
    _sc21("1.7B", (24, 2304, 24), 1, 1, 32, 16, 512, None, 137.0),
    _sc21("3.6B", (30, 3072, 32), 2, 1, 64, 16, 512, None, 138.0),
    _sc21("7.5B", (36, 4096, 32), 4, 1, 128, 16, 512, None, 142.0),
    _sc21("18.4B", (40, 6144, 48), 8, 1, 256, 8, 1024, None, 135.0, fitted=True),
    _sc21("39.1B", (48, 8192, 64), 8, 2, 512, 4, 1536, None, 138.0),
    _sc21("76.1B", (60, 10240, 80), 8, 4, 1024, 2, 1792, 5, 140.0),
    _sc21("145.6B", (80, 12288, 96), 8, 8, 1536, 2, 2304, 5, 148.0),
    _sc21("310.1B", (96, 16384, 128), 8, 16, 1920, 1, 2160, 3, 155.0),
    _sc21("529.6B", (105, 20480, 128), 8, 35, 2520, 1, 2520, 1, 163.0),
    _titan_a100("Llama 3 8B", LLAMA3_8B, 1, "selective", 2973.0),
    _titan_a100("Llama 3 70B", LLAMA3_70B, 1, "full", 331.0),
    _titan_a100("Llama 2 13B", LLAMA2_13B, 2, "none", 2162.0, fitted=True),
    _titan_a100("Llama 2 70B", LLAMA2_70B, 2, "full", 353.0),
    _titan(8, 5762.0, fitted=True),
    _titan(128, 5605.0),
)


def fit_gemm_efficiency(run: PublishedRun) -> float:
    """The ``gemm_efficiency`` of ``run``'s GPU kind at which the planner reproduces
    ``run``'s published figure exactly (bisection; throughput rises with the efficiency)."""
    gpu = get_gpu(run.gpu, run.stack)
    lo, hi = 0.05, 1.0
    wl = Workload(run.global_batch_size, run.model.seq_length)
    sign = -1.0 if run.metric == "step_seconds" else 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        e = estimate(run.model, run.layout, wl, replace(gpu, gemm_efficiency=mid))
        if sign * (run.predicted(e) - run.value) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def validation_table() -> str:
    """The markdown table of docs/plan.md: every run's published figure, the prediction and
    the error (``python -m mtnlg.plan.published`` prints it)."""
    lines = ["| run | GPU | layout | metric | published | planner | error | source |",
             "|---|---|---|---|---|---|---|---|"]
    for r in RUNS:
        lay = r.layout
        layout = lay.describe() + (f" {lay.schedule_name}" if lay.pp > 1 else "") + \
            f" {lay.activation_checkpoint}" + (" fsdp" if lay.fsdp else "")
        unit = METRICS[r.metric]
        fmt = "{:,.0f}" if r.metric == "tokens_per_second_per_gpu" else "{:.1f}"
        err = f"{100 * r.error():+.1f}%" + (" (fitted)" if r.fitted else "")
        lines.append(f"| {r.name} | {r.gpu} | {layout} | {unit} | {fmt.format(r.value)} | "
                     f"{fmt.format(r.predicted())} | {err} | {r.source} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(validation_table())
