"""Float8 training (``train.dtype=fp8``): the GPT's linear layers swapped for torchao's
``Float8Linear``.

What runs in float8: the matmuls of the converted layers (forward, and both gradients in
the backward). Their inputs and weights are cast to e4m3, the output gradient to e5m2,
each with one dynamic scale per tensor (torchao's "tensorwise" recipe: its fastest, the
cuBLAS fp8 GEMM on Ada/Hopper tensor cores); the GEMMs return bf16, the forward one with
cuBLAS's fast accumulation and the two backward ones without (torchao's defaults). Everything else (embeddings, norms, attention's softmax, the head, the loss)
runs as on a bf16 run, under bf16 autocast; parameters, gradients and AdamW's state stay
fp32, as on a bf16 run.

Which layers: every ``nn.Linear`` of the blocks (attention's wq, wk, wv, wo; the MLP's
w_up, w_gate, w_down) whose two dimensions are multiples of 16, except the head:

* the fp8 GEMM (``torch._scaled_mm``) needs both of a weight's dimensions to be multiples
  of 16; a layer that is not stays bf16 rather than being padded;
* the head (``output``) stays bf16: its logits go straight into the softmax and the loss
  over the whole vocabulary, with no later layer to average its rounding away, and under
  ``tie_embeddings`` its weight is also the embedding table (torchtitan filters its
  ``output`` for the same reason).

Where: on the whole one-device model (the meta device will do), before anything of
``parallelize_gpt`` or the pipeline split (``mtnlg.train.engine.build_engine`` calls
:func:`convert_to_float8`), as torchtitan converts before it parallelizes. A
``Float8Linear`` is an ``nn.Linear`` with the same ``weight``/``bias`` parameters, so the
pipeline split, activation checkpointing, compile and FSDP2/DDP see the layers they
would see on a bf16 run, parameter names and checkpoints included (a bf16 checkpoint
resumes in fp8 and back). FSDP2 gathers the fp32 weights in bf16 (``param_dtype``, as on
a bf16 run) and the layer casts them to float8 after the gather (torchao's float8
all-gather, ``enable_fsdp_float8_all_gather``, is off). Tensor parallelism would need
torchao's ``Float8ColwiseParallel``/``Float8RowwiseParallel`` in the plan;
``TrainRunConfig`` refuses ``fp8`` with ``parallel.tp > 1`` until that is built and
measured.

Float8 pays off compiled (``parallel.compile=true``): inductor fuses each amax, scale and
cast into a few kernels; eager runs them one by one.
"""

from __future__ import annotations

from torch import nn

from mtnlg.config import ConfigError
from mtnlg.progress import get_logger

log = get_logger(__name__)

RECIPE = "tensorwise"
HEAD = "output"        # the GPT's vocabulary projection (tied to the embedding or not)
FP8_GEMM_MULTIPLE = 16  # torch._scaled_mm: both dimensions of the weight
TORCHAO_HINT = "pip install 'mtnlg[fp8]' (torchao>=0.10)"


def require_torchao():
    """``torchao.float8``, or a ``ConfigError`` naming the package and the extra to install."""
    try:
        import torchao.float8 as float8
    except ImportError as e:
        raise ConfigError(f"train.dtype=fp8 trains through torchao's float8 training, and torchao is not "
                          f"installed ({e}); install it: {TORCHAO_HINT}") from None
    return float8


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """Whether the layer ``fqn`` of a GPT trains in float8 (see the module docstring)."""
    if not isinstance(module, nn.Linear) or fqn == HEAD:
        return False
    out_features, in_features = module.weight.shape
    return out_features % FP8_GEMM_MULTIPLE == 0 and in_features % FP8_GEMM_MULTIPLE == 0


def convert_to_float8(model: nn.Module) -> list[str]:
    """Swap ``model``'s eligible ``nn.Linear`` layers for ``Float8Linear`` in place; returns
    the converted layers' names. ``model`` is the whole one-device GPT, on any device,
    before it is parallelized. Raises ``ConfigError`` when torchao is missing or no layer
    qualifies (every block dimension off the multiple of 16)."""
    float8 = require_torchao()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    converted = [name for name, m in linears.items() if float8_filter(m, name)]
    if not converted:
        raise ConfigError(f"train.dtype=fp8: no linear layer of this model can train in float8 (each needs both "
                          f"dimensions a multiple of {FP8_GEMM_MULTIPLE}; model.hidden_size and the MLP and "
                          f"head sizes decide them); use train.dtype=bf16")
    config = float8.Float8LinearConfig.from_recipe_name(RECIPE)
    float8.convert_to_float8_training(model, module_filter_fn=float8_filter, config=config)
    kept = sorted(set(linears) - set(converted))
    log.info("float8 (%s scaling): %d linear layers converted; kept in bf16: %s", RECIPE, len(converted),
             ", ".join(kept) or "none")
    return converted


def float8_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s layers that train in float8 (``Float8Linear``)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
