"""mtnlg: train Megatron-Turing-NLG-style GPT models, from raw text to an evaluated model."""

__version__ = "0.1.0"

__all__ = ["MegatronLM", "load_data", "__version__"]


def __getattr__(name: str):
    # The Python API imports torch; load it on first use so `mtnlg --help` and the
    # light steps (extract, tokenize) never pay for it.
    if name in ("MegatronLM", "load_data"):
        from mtnlg import api

        return getattr(api, name)
    raise AttributeError(f"module 'mtnlg' has no attribute {name!r}")
