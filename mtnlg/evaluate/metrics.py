"""Validation loss / perplexity over a token stream, and last-word (cloze) accuracy.

Validation loss is the mean next-token cross-entropy (nats) over every token of the
validation split: the documents' tokens back to back, each ending in the end-of-document
token (as the tokenizer wrote them), preceded by one end-of-document token so that the
first document starts the way every document does in training. The stream is cut into
non-overlapping windows of ``seq_length`` predictions (the last one shorter), so each
token is predicted exactly once, from the context inside its window (Megatron's
evaluation). Perplexity is ``exp(loss)``.

Every figure comes with a 95% confidence interval: for the loss, the normal interval of a
ratio estimator with the windows as the sampled units (tokens inside a window are not
independent; windows nearly are), mapped through ``exp`` for perplexity; for accuracy,
Wilson's score interval, which stays inside [0, 1] and is honest for a handful of items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mtnlg.evaluate.cloze import ClozeItem
from mtnlg.model.decode import device_of
from mtnlg.progress import Progress


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass
class LossResult:
    loss: float          # mean nats per predicted token
    perplexity: float    # exp(loss)
    tokens: int          # predicted tokens
    windows: int         # forward windows
    loss_ci95: tuple[float, float] = (math.nan, math.nan)
    perplexity_ci95: tuple[float, float] = (math.nan, math.nan)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% (by default) Wilson score interval of a proportion k/n."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def ratio_interval(sums: list[float], counts: list[int], z: float = Z95) -> tuple[float, float]:
    """Normal interval of ``sum(sums) / sum(counts)`` with the (sum, count) pairs as the
    sampled units (the ratio estimator's linearised variance)."""
    n = len(sums)
    if n < 2:
        return (math.nan, math.nan)
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    r = s.sum() / c.sum()
    var = n / (n - 1) * float(((s - r * c) ** 2).sum()) / float(c.sum()) ** 2
    half = z * math.sqrt(var)
    return (r - half, r + half)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


@torch.no_grad()
def stream_loss(model: torch.nn.Module, stream: np.ndarray, seq_length: int, batch_size: int = 8,
                progress_desc: str = "validation loss") -> LossResult:
    """Mean next-token loss over ``stream`` (1-D token ids), window by window."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_pred = len(stream) - 1
    if n_pred < 1:
        raise ValueError(f"need at least 2 tokens to measure a loss, got {len(stream)}")
    device = device_of(model)
    starts = list(range(0, n_pred, seq_length))
    total_nll, total_tok = 0.0, 0
    window_nll: list[float] = []
    model.eval()
    prog = Progress(progress_desc, total=n_pred, unit="tokens")
    for b in range(0, len(starts), batch_size):
        group = starts[b:b + batch_size]
        # a full window holds seq_length + 1 tokens: inputs [s, s+T), targets [s+1, s+T+1)
        lengths = [min(seq_length, n_pred - s) for s in group]
        T = max(lengths)
        x = torch.zeros(len(group), T, dtype=torch.long)                         # (b, T)
        y = torch.full((len(group), T), -100, dtype=torch.long)                  # (b, T); -100 = ignore
        for r, (s, n) in enumerate(zip(group, lengths)):
            w = torch.from_numpy(np.asarray(stream[s:s + n + 1], dtype=np.int64))
            x[r, :n] = w[:-1]
            y[r, :n] = w[1:]
        logits = model(x.to(device)).float()                                     # (b, T, V_padded)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                              ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                    ignore_index=-100, reduction="none").view(len(group), T)   # (b, T)
        window_nll += per_token.sum(dim=1).tolist()
        total_tok += sum(lengths)
        prog.update(sum(lengths))
    prog.close()
    loss = total_nll / total_tok
    lo, hi = ratio_interval(window_nll, [min(seq_length, n_pred - s) for s in starts])
    return LossResult(loss=loss, perplexity=_exp(loss), tokens=total_tok, windows=len(starts),
                      loss_ci95=(lo, hi), perplexity_ci95=(_exp(lo), _exp(hi)))


@torch.no_grad()
def cloze_accuracy(model: torch.nn.Module, items: list[ClozeItem], batch_size: int = 8) -> dict[str, float]:
    """LAMBADA-style accuracy: an item counts when the greedy prediction at every position
    of the target word is that word's token (the word is predicted whole, not just its
    first piece). Also returns the mean loss of the target tokens."""
    if not items:
        return {"cloze_items": 0, "cloze_correct": 0, "cloze_accuracy": None, "cloze_target_loss": None,
                "cloze_accuracy_ci95": None}
    device = device_of(model)
    model.eval()
    correct, nll, ntok = 0, 0.0, 0
    prog = Progress("last-word accuracy", total=len(items), unit="items")
    for b in range(0, len(items), batch_size):
        group = items[b:b + batch_size]
        seqs = [it.context + it.target for it in group]
        T = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(group), T, dtype=torch.long)                         # (b, T), right-padded
        for r, s in enumerate(seqs):
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
        logits = model(x.to(device)).float().cpu()                               # (b, T, V_padded)
        for r, it in enumerate(group):
            c, t = len(it.context), len(it.target)
            # logits at position p predict token p + 1: the target's tokens sit at c .. c+t-1
            tl = logits[r, c - 1:c - 1 + t]                                      # (t, V_padded)
            tgt = torch.tensor(it.target)
            correct += int(torch.equal(tl.argmax(-1), tgt))
            nll += float(F.cross_entropy(tl, tgt, reduction="sum"))
            ntok += t
        prog.update(len(group))
    prog.close()
    return {"cloze_items": len(items), "cloze_correct": correct, "cloze_accuracy": correct / len(items),
            "cloze_accuracy_ci95": list(wilson_interval(correct, len(items))), "cloze_target_loss": nll / ntok}
