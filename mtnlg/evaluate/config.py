"""``EvaluateConfig``: what the evaluate step measures and how (the pipeline sets it with
``evaluate_overrides``, the CLI with its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtnlg.config import Config

DEFAULT_PROMPTS = [
    "The Python tutorial",
    "A list comprehension",
    "To install a package,",
    "The following example shows",
    "def main():",
]


@dataclass
class EvaluateConfig(Config):
    # sequences per forward pass
    batch_size: int = field(default=8, metadata={"min": 1})
    # last-word (cloze) items to build from the validation documents (0 = none)
    max_cloze_items: int = field(default=500, metadata={"min": 0})
    # validation tokens to read (None = the whole split)
    max_eval_tokens: int | None = field(default=None, metadata={"min": 1})
    # sample generations: one per prompt, this many tokens each
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = field(default=32, metadata={"min": 0})
    # torch device the model runs on
    device: str = "cpu"
