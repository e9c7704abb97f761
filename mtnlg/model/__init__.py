"""The GPT model for one device (``gpt``), its config (``config``), named presets
(``presets``) and parameter/FLOP counts (``flops``). ``GPT`` is imported on first use so
that reading a config does not load torch."""

from mtnlg.model.config import ModelConfig
from mtnlg.model.flops import count_parameters, flops_per_token
from mtnlg.model.presets import PRESETS, get_preset

__all__ = ["GPT", "ModelConfig", "PRESETS", "count_parameters", "flops_per_token", "get_preset"]


def __getattr__(name: str):
    if name == "GPT":
        from mtnlg.model.gpt import GPT

        return GPT
    raise AttributeError(f"module 'mtnlg.model' has no attribute {name!r}")
