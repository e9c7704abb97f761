"""The log-probabilities of a prompt's own tokens: what ``echo`` with ``logprobs`` reports
on ``/v1/completions`` (and ``max_tokens: 0`` with them scores a text).

    scorer = PromptScorer(engine.model, engine.tokenizer)
    first, tokens = scorer(prompt_ids, k=2)     # first token's text; a TokenLogprob per later token

One forward pass over the whole prompt, no cache: the logits at place ``j`` give token
``j + 1``'s log-probability (the first token has none: nothing precedes it). The values are
those the engine reports for generated tokens: the log-softmax, in float32, of the model's
logits over the tokenizer's vocabulary (the padding rows of the output layer left out).

The pass runs beside the engine's worker, not in its batch: a forward pass without a cache
changes nothing in the model, so the running requests are not disturbed. One prompt is
scored at a time (a lock), which bounds the memory these passes take.
"""

from __future__ import annotations

import os
import threading

import torch

from mtnlg.model.decode import continuation_text
from mtnlg.serve.engine import TokenLogprob

CHUNK = 512  # prompt places turned into float32 log-probabilities at a time


def token_texts(tokenizer, ids: list[int]) -> list[tuple[str, int]]:
    """Each token's text and where it begins in the text of ``ids``; the texts join into
    it. A token's text is what the text of its prefix adds that the whole text keeps: the
    bytes of a character split over several tokens give "" until the one that completes it."""
    full = tokenizer.decode(ids)
    out: list[tuple[str, int]] = []
    end = 0
    for j in range(len(ids)):
        prefix = tokenizer.decode(ids[:j + 1])
        upto = max(end, len(os.path.commonprefix([prefix, full])))
        out.append((full[end:upto], end))
        end = upto
    return out


class PromptScorer:
    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    def __call__(self, ids: list[int], k: int) -> tuple[str, list[TokenLogprob]]:
        """The first token's text, and for each later token its :class:`TokenLogprob`
        (offsets into the prompt's text, ``k`` most likely alternatives by id)."""
        texts = token_texts(self.tokenizer, ids)
        tokens: list[TokenLogprob] = []
        if len(ids) < 2:
            return texts[0][0], tokens
        vocab = self.tokenizer.vocab_size
        with self._lock, torch.inference_mode():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)                  # (1, n)
            logits = self.model(x)[0, :-1]                                                 # (n-1, V_padded)
            chosen = torch.tensor(ids[1:], dtype=torch.long, device=self.device)            # (n-1,)
            values, top_ids, top_vals = [], [], []
            for lo in range(0, len(ids) - 1, CHUNK):
                lp = torch.log_softmax(logits[lo:lo + CHUNK, :vocab].float(), dim=-1)      # (c, V)
                values.append(lp.gather(1, chosen[lo:lo + CHUNK, None])[:, 0])
                if k:
                    v, i = torch.topk(lp, min(k, vocab), dim=-1)                           # (c, k)
                    top_vals.append(v)
                    top_ids.append(i)
            values = torch.cat(values).tolist()
            tv = torch.cat(top_vals).tolist() if k else [[]] * (len(ids) - 1)
            ti = torch.cat(top_ids).tolist() if k else [[]] * (len(ids) - 1)
        for j in range(1, len(ids)):
            text, offset = texts[j]
            top = [(i, text if i == ids[j] else continuation_text(self.tokenizer, [ids[j - 1]], [i]), v)
                   for i, v in zip(ti[j - 1], tv[j - 1])]
            tokens.append(TokenLogprob(ids[j], text, offset, values[j - 1], top))
        return texts[0][0], tokens
