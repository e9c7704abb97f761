"""``EvaluateConfig``: what the evaluate step measures and how (the pipeline sets it with
``evaluate_overrides``, the CLI with its flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtnlg.config import Config, ConfigError
from mtnlg.model.sampling import SamplingConfig

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
    # sample generations: one per prompt, sampled reproducibly (seed; temperature 0 = greedy),
    # at least min_new_tokens (end of document is not drawn before; capped by max_new_tokens)
    # and at most max_new_tokens
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = field(default=40, metadata={"min": 0})
    min_new_tokens: int = field(default=24, metadata={"min": 0})
    temperature: float = field(default=0.8, metadata={"min": 0.0})
    top_p: float = field(default=0.95, metadata={"gt": 0.0, "max": 1.0})
    repetition_penalty: float = field(default=1.0, metadata={"gt": 0.0})
    seed: int = 1234
    # write the cloze items as a local lm-evaluation-harness task (OUTPUT/lm_eval/), and
    # run the harness on the model's Hugging Face export (MODEL/hf) with it
    lm_eval_task: bool = True
    run_lm_eval: bool = False
    # torch device the model runs on
    device: str = "cpu"

    def validate(self) -> None:
        if self.run_lm_eval and not self.lm_eval_task:
            raise ConfigError("run_lm_eval=true needs lm_eval_task=true (the harness runs the task it writes)")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens,
                              min_new_tokens=min(self.min_new_tokens, self.max_new_tokens),
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                              repetition_penalty=self.repetition_penalty)

    def describe_sampling(self) -> str:
        if self.temperature == 0:
            how = "greedy"
        else:
            how = f"sampled: temperature {self.temperature:g}, top-p {self.top_p:g}, seeds {self.seed}+i"
        if self.repetition_penalty != 1.0:
            how += f", repetition penalty {self.repetition_penalty:g}"
        return f"{how}; {min(self.min_new_tokens, self.max_new_tokens)}-{self.max_new_tokens} new tokens"
