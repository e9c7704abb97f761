"""mtnlg: train Megatron-Turing-NLG-style GPT models, from raw text to an evaluated model."""

__version__ = "0.1.0"
