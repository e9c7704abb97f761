"""Text generation from a GPT with a key/value cache.

    model, cfg, tok = load_fused("out/model")
    text = generate(model, tok, "The list type", max_new_tokens=40, temperature=0.8, top_p=0.9, seed=1)

The prompt is read as the start of a new document: it is preceded by the end-of-document
token, which is what precedes every document in the training stream. The prompt is run
through the model once (prefill), filling the cache; each new token then costs one
single-position forward pass that attends to the cached keys and values. Generation stops
after ``max_new_tokens`` or at the end-of-document token (``stop_at_eod``).

The model sees at most ``seq_length`` positions. A prompt longer than that keeps its last
tokens; when the cache is full the newest three quarters of the tokens are run through
the model again as a fresh window and generation continues (the same sliding window a
recomputing generator would use, paid once per quarter window).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from mtnlg.model.sampling import SamplingConfig, adjust_logits, sample_next_token
from mtnlg.progress import get_logger

log = get_logger("mtnlg.generate")


def _mask_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padding ids (>= the tokenizer's vocabulary) are never generated.  (B, V_padded)."""
    if logits.shape[-1] > vocab_size:
        logits = logits.clone()
        logits[..., vocab_size:] = float("-inf")
    return logits


def device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def stream_tokens(model: torch.nn.Module, prompt_ids: list[int], sampling: SamplingConfig,
                  vocab_size: int, eod_id: int | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time (the end-of-document token is not yielded).

    ``prompt_ids`` must be non-empty; ``vocab_size`` is the tokenizer's (the model's logits
    may be padded beyond it). ``use_cache=False`` recomputes the whole window at every
    step: the reference the cached path is tested against.
    """
    from mtnlg.model.gpt import KVCache

    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    cfg = model.cfg
    window = cfg.seq_length
    device = device_of(model)
    gen = None
    if sampling.seed is not None and sampling.temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(sampling.seed))
    context = list(prompt_ids)[-window:]                                        # the model's view
    history = list(context)                                                      # for the repetition penalty
    generated = 0
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, batch_size=1) if use_cache else None
        pending = context                                                        # not yet in the cache
        for _ in range(sampling.max_new_tokens):
            if use_cache and cache.length + len(pending) > window:
                # the cache is full: restart from the newest 3/4 window
                context = context[-(window - window // 4):]
                cache.reset()
                pending = context
            if not use_cache:
                context = context[-window:]
                pending = context
            x = torch.tensor([pending], dtype=torch.long, device=device)         # (1, t)
            logits = model(x, cache=cache) if use_cache else model(x)            # (1, t, V_padded)
            last = _mask_padding(logits[:, -1, :].float(), vocab_size)[0]        # (V_padded,)
            last = adjust_logits(last, history, generated, sampling, eod_id)
            nxt = int(sample_next_token(last[None], sampling.temperature, sampling.top_k, sampling.top_p, gen)[0])
            if sampling.stop_at_eod and eod_id is not None and nxt == eod_id:
                return
            yield nxt
            generated += 1
            history.append(nxt)
            context.append(nxt)
            pending = [nxt]
    finally:
        model.train(was_training)


def generate_ids(model: torch.nn.Module, prompt_ids: list[int], sampling: SamplingConfig | None = None,
                 vocab_size: int | None = None, eod_id: int | None = None, use_cache: bool = True) -> list[int]:
    """The new token ids after ``prompt_ids`` (see :func:`stream_tokens`)."""
    sampling = sampling or SamplingConfig()
    vocab = vocab_size if vocab_size is not None else model.cfg.vocab_size
    return list(stream_tokens(model, prompt_ids, sampling, vocab, eod_id, use_cache))


def prompt_ids_for(tokenizer, prompt: str) -> list[int]:
    """End-of-document token + the prompt's tokens: the prompt starts a new document."""
    return [tokenizer.eod_id] + tokenizer.encode(prompt)


def continuation_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The text of new ``ids`` as it reads after the prompt: decoded after the prompt's
    last token, so the space between prompt and continuation is kept (SentencePiece drops
    a leading space when a piece is decoded alone)."""
    anchor = [i for i in prompt_ids[-1:] if i != tokenizer.eod_id]
    if not anchor:
        return tokenizer.decode(ids)
    base, full = tokenizer.decode(anchor), tokenizer.decode(anchor + list(ids))
    return full[len(base):] if full.startswith(base) else tokenizer.decode(ids)


def generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_at_eod: bool = True,
             on_token: Callable[[str], None] | None = None, min_new_tokens: int = 0,
             repetition_penalty: float = 1.0) -> str:
    """The continuation of ``prompt`` (without the prompt; ``prompt + result`` reads as one text).

    ``temperature=0`` is greedy decoding; otherwise tokens are sampled after top-k / top-p
    filtering, reproducibly for a given ``seed``. ``min_new_tokens`` keeps the end of
    document away that long; ``repetition_penalty > 1`` discourages repeats. ``on_token``
    receives the text as it grows (each call gets the newly decoded piece), for streaming
    to a terminal.
    """
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, stop_at_eod=stop_at_eod, min_new_tokens=min_new_tokens,
                              repetition_penalty=repetition_penalty)
    prompt_ids = prompt_ids_for(tokenizer, prompt)
    ids: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    for tok in stream_tokens(model, prompt_ids, sampling, tokenizer.vocab_size, tokenizer.eod_id):
        ids.append(tok)
        if on_token is not None:
            text = continuation_text(tokenizer, prompt_ids, ids)
            if len(text) > len(shown) and text.startswith(shown):
                on_token(text[len(shown):])
                shown = text
    dt = time.perf_counter() - t0
    log.debug("generated %d tokens in %.2fs (%.1f tokens/s)", len(ids), dt, len(ids) / max(dt, 1e-9))
    text = continuation_text(tokenizer, prompt_ids, ids)
    if on_token is not None and len(text) > len(shown) and text.startswith(shown):
        on_token(text[len(shown):])
    return text


class BatchDecoder:
    """Several prompts decoded together, one forward pass per step for the whole batch.

        dec = BatchDecoder(model, [ids_a, ids_b], [SamplingConfig(...), SamplingConfig(...)],
                           tokenizer.vocab_size, tokenizer.eod_id)
        while not dec.done:
            for row, token in enumerate(dec.step()):   # None: that row has finished
                ...
        dec.finish_reason[row]                         # "stop" (end of document, or finish()) | "length"
        dec.last_logits                                # (B, V_padded) the last step's next-token logits

    The prompts are left-padded to the longest and share one ``KVCache`` (its ``pad``
    keeps each sequence's positions and attention its own), so a row's tokens are those
    :func:`stream_tokens` gives it alone (greedy: the same ids; sampled: the same draws
    from the row's own seeded generator, up to rounding of the logits). Each row must fit
    the window: ``len(prompt) + max_new_tokens <= seq_length`` (no sliding window here;
    servers reject longer requests up front). ``finish(row)`` stops a row early (a stop
    string, a client gone); the batch ends when every row has finished.
    """

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], samplings: list[SamplingConfig],
                 vocab_size: int, eod_id: int | None = None):
        from mtnlg.model.gpt import KVCache

        if not prompts or len(prompts) != len(samplings):
            raise ValueError(f"{len(prompts)} prompts but {len(samplings)} sampling configs")
        window = model.cfg.seq_length
        for i, (p, s) in enumerate(zip(prompts, samplings)):
            if not p:
                raise ValueError(f"prompt {i} has no tokens")
            if len(p) + s.max_new_tokens > window:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens={s.max_new_tokens} exceed the "
                                 f"model's window of {window} positions")
        self.model, self.samplings, self.vocab_size, self.eod_id = model, samplings, vocab_size, eod_id
        self.device = device_of(model)
        longest = max(map(len, prompts))
        # room for the longest prompt and the most new tokens any row asks for
        self.steps_left = max(s.max_new_tokens for s in samplings)
        if longest + self.steps_left > window:
            raise ValueError(f"these prompts cannot share a batch: the longest ({longest} tokens) plus "
                             f"{self.steps_left} new tokens exceed {window} positions")
        pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long, device=self.device)
        self.cache = KVCache.for_model(model, batch_size=len(prompts), pad=pad)
        filler = eod_id if eod_id is not None else 0
        self._pending = torch.tensor([[filler] * (longest - len(p)) + list(p) for p in prompts],
                                     dtype=torch.long, device=self.device)                    # (B, longest)
        self.history = [list(p) for p in prompts]
        self.generated = [0] * len(prompts)
        self.finish_reason: list[str | None] = [None if s.max_new_tokens > 0 else "length" for s in samplings]
        self.last_logits: torch.Tensor | None = None
        self.generators: list[torch.Generator | None] = []
        for s in samplings:
            g = None
            if s.seed is not None and s.temperature > 0:
                g = torch.Generator(device=self.device)
                g.manual_seed(int(s.seed))
            self.generators.append(g)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reason)

    def finish(self, row: int, reason: str = "stop") -> None:
        if self.finish_reason[row] is None:
            self.finish_reason[row] = reason

    @torch.no_grad()
    def step(self) -> list[int | None]:
        """One new token for every row still running (None for the others)."""
        if self.done:
            return [None] * len(self.finish_reason)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(self._pending, cache=self.cache)                               # (B, t, V_padded)
        finally:
            self.model.train(was_training)
        last = _mask_padding(logits[:, -1, :].float(), self.vocab_size)                        # (B, V_padded)
        self.last_logits = last  # the model's own, before any sampling adjustment (servers' logprobs)
        out: list[int | None] = []
        feed = []
        for row, s in enumerate(self.samplings):
            if self.finish_reason[row] is not None:
                out.append(None)
                feed.append(self.eod_id if self.eod_id is not None else 0)
                continue
            row_logits = adjust_logits(last[row], self.history[row], self.generated[row], s, self.eod_id)
            nxt = int(sample_next_token(row_logits[None], s.temperature, s.top_k, s.top_p, self.generators[row])[0])
            feed.append(nxt)
            if s.stop_at_eod and self.eod_id is not None and nxt == self.eod_id:
                self.finish_reason[row] = "stop"
                out.append(None)
                continue
            out.append(nxt)
            self.generated[row] += 1
            self.history[row].append(nxt)
            if self.generated[row] >= s.max_new_tokens:
                self.finish_reason[row] = "length"
        self._pending = torch.tensor(feed, dtype=torch.long, device=self.device)[:, None]      # (B, 1)
        return out
