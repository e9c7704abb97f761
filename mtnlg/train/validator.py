"""Validation during training: the mean loss over the first ``train.eval_iters`` global
batches of the validation split, every ``train.eval_every`` steps and at the end."""

from __future__ import annotations

import torch

from mtnlg.dist import all_reduce_sum
from mtnlg.train.engine import Engine


class Validator:
    def __init__(self, train_cfg, engine: Engine, dataset, dp_rank: int, dp: int):
        self.t = train_cfg
        self.engine = engine
        self.dataset = dataset  # None when train.eval_iters == 0
        self.dp_rank, self.dp = dp_rank, dp

    def should_validate(self, step: int, last_step: bool) -> bool:
        return self.t.eval_iters > 0 and self.dataset is not None and (
            last_step or bool(self.t.eval_every and step % self.t.eval_every == 0))

    @torch.no_grad()
    def validate(self) -> float:
        """Mean validation loss over ``eval_iters`` fixed global batches; collective."""
        model = self.engine.model
        model.eval()
        gbs = self.t.global_batch_size
        total, n = 0.0, 0
        for it in range(self.t.eval_iters):
            tokens = self.dataset.global_batch(it * gbs, gbs, self.dp_rank, self.dp)
            for loss in self.engine.evaluate(tokens):
                total += loss
                n += 1
        model.train()
        # Every rank of a tp group holds the same value; average over the loss ranks.
        (s,) = all_reduce_sum([total / max(n, 1)], self.engine.device)
        return s / self.engine.loss_ranks
