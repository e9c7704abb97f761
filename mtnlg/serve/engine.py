"""The serving engine: requests from many clients decoded together on one model.

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=8, max_queue=64))
    engine.start()
    handle = engine.submit(prompt_ids, sampling, stop=["\\n\\n"], on_event=callback)  # or QueueFull
    handles = engine.submit_many([Request(...), Request(...)])   # all accepted, or none
    ...
    engine.close()   # finishes what was accepted, then stops

One worker thread owns the model. It takes the oldest waiting request, gathers more for up
to ``batch_wait_ms`` (up to ``max_batch_size`` that fit one window together) and decodes
them as one ``BatchDecoder`` batch: one forward pass per step for all of them, so eight
concurrent clients cost about what one does on hardware that is not saturated. A batch
runs until all its rows finish; requests that arrive meanwhile wait for the next one.
Waiting requests are bounded (``max_queue``): past that ``submit`` raises ``QueueFull``,
which the HTTP layer answers with 429.

Each request's text is assembled from its tokens by :class:`TextStream` (stop strings,
held-back partial matches) and handed to ``on_event`` as it grows, from the worker thread:
``("text", Piece)`` (the new text, and the :class:`TokenLogprob` of each token whose text
begins in it when the request asked for ``logprobs``), then ``("done", {"finish_reason",
"prompt_tokens", "completion_tokens"})`` or ``("error", message)``.

Log-probabilities are the model's own: the log-softmax of its logits over the tokenizer's
vocabulary (the padding rows of the output layer left out), before temperature, top-p,
the repetition penalty or ``min_tokens`` change anything, as other OpenAI-compatible
servers report them by default.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtnlg.config import Config
from mtnlg.model.decode import BatchDecoder, continuation_text
from mtnlg.model.sampling import SamplingConfig
from mtnlg.progress import get_logger

log = get_logger("mtnlg.serve")

Event = tuple[str, object]


class QueueFull(Exception):
    """The engine already holds ``max_queue`` waiting requests."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class EngineConfig(Config):
    # requests decoded together in one batch
    max_batch_size: int = field(default=8, metadata={"min": 1})
    # requests waiting for a batch; more are refused (HTTP 429)
    max_queue: int = field(default=64, metadata={"min": 1})
    # how long the first request of a batch waits for company
    batch_wait_ms: float = field(default=20.0, metadata={"min": 0.0})


@dataclass
class TokenLogprob:
    """One generated token: its id, the text it adds, where that begins in the reply, its
    log-probability and the ``k`` most likely tokens at its place ``(id, text, logprob)``."""

    id: int
    text: str
    offset: int
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class Piece:
    """New text of a reply, with the tokens whose text begins in it (when logprobs were asked)."""

    text: str
    tokens: list[TokenLogprob] = field(default_factory=list)


class TextStream:
    """Text of a growing list of new token ids, cut at the first stop string.

    ``push(id)`` returns ``(delta, stopped)``: the text that is now certain (a possible
    beginning of a stop string is held back until it is decided) and whether a stop
    string has appeared. ``flush()`` releases what was held back when generation ends.
    The text is decoded after the prompt's last token, so a continuation keeps the space
    that separates it from the prompt (SentencePiece drops a leading space when a piece
    is decoded alone).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None):
        self.tokenizer, self.prompt_ids = tokenizer, prompt_ids
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.shown = ""
        self.text = ""
        self.full = ""  # the text of every id, not cut at a stop string
        self.stopped = False

    def _decode(self) -> str:
        return continuation_text(self.tokenizer, self.prompt_ids, self.ids)

    def _emit(self, upto: str) -> str:
        if len(upto) > len(self.shown) and upto.startswith(self.shown):
            delta = upto[len(self.shown):]
            self.shown = upto
            return delta
        return ""

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.full = self._decode()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text = text[:min(cuts)]
            self.stopped = True
            return self._emit(self.text), True
        self.text = text
        return self._emit(text[:len(text) - self._partial(text)]), False

    def _partial(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins a stop string (held back)."""
        for k in range(min(len(text), self.hold), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        return self._emit(self.text)


class ReplyStream:
    """A :class:`TextStream` that also tracks each token's log-probabilities (``logprobs``:
    how many alternatives to report, None for none) and hands out :class:`Piece` s.

    A token is released with the piece of text that shows its first character; at the
    end, every token is released, except those wholly inside a cut-off stop string.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None, logprobs: int | None):
        self.text = TextStream(tokenizer, prompt_ids, stop)
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self.prev = prompt_ids[-1]
        self.pending: list[TokenLogprob] = []

    @property
    def ids(self) -> list[int]:
        return self.text.ids

    def push(self, token: int, logprobs: torch.Tensor | None) -> tuple[Piece | None, bool]:
        """``logprobs``: (V,) the model's log-probabilities at this token's place."""
        before = self.text.full
        delta, stopped = self.text.push(token)
        if self.logprobs is not None and logprobs is not None:
            after = self.text.full
            offset = len(before) if after.startswith(before) else len(os.path.commonprefix([before, after]))
            self.pending.append(self._record(token, after[offset:], offset, logprobs))
        self.prev = token
        return self._piece(delta, len(self.text.shown)), stopped

    def flush(self) -> Piece | None:
        rest = self.text.flush()
        return self._piece(rest, len(self.text.text) if self.text.stopped else None)

    def _record(self, token: int, text: str, offset: int, logprobs: torch.Tensor) -> TokenLogprob:
        top: list[tuple[int, str, float]] = []
        if self.logprobs:
            values, ids = torch.topk(logprobs, min(self.logprobs, logprobs.shape[-1]))
            for v, i in zip(values.tolist(), ids.tolist()):
                alt = text if i == token else continuation_text(self.tokenizer, [self.prev], [i])
                top.append((i, alt, v))
        return TokenLogprob(token, text, offset, float(logprobs[token]), top)

    def _piece(self, delta: str, shown: int | None) -> Piece | None:
        """``delta`` with the pending tokens whose text begins before ``shown`` (None: all)."""
        out = [t for t in self.pending if shown is None or t.offset < shown]
        self.pending = [t for t in self.pending if not (shown is None or t.offset < shown)]
        return Piece(delta, out) if delta or out else None


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingConfig
    on_event: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    # how many most likely alternatives to report with each token's log-probability; None: no logprobs
    logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def cancel(self) -> None:
        """The client has gone: stop decoding this request at the next step."""
        self.cancelled.set()


@dataclass
class EngineStats:
    requests: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    batches: int = 0
    batched_requests: int = 0
    tokens: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_batch_size"] = self.batched_requests / self.batches if self.batches else 0.0
        return d


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or EngineConfig()
        self.window = model.cfg.seq_length
        self.stats = EngineStats()
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=self.config.max_queue)
        self._held: collections.deque[Request] = collections.deque()  # taken from the queue, did not fit
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mtnlg-serve-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 60.0) -> None:
        """Refuse new requests, finish the accepted ones, stop the worker."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    @property
    def running(self) -> bool:
        """The worker is up and takes requests."""
        return self._thread is not None and self._thread.is_alive() and not self.closing

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    # ------------------------------------------------------------------ requests

    def submit(self, prompt_ids: list[int], sampling: SamplingConfig, on_event: Callable[[Event], None],
               stop: list[str] | None = None, logprobs: int | None = None) -> Request:
        return self.submit_many([Request(list(prompt_ids), sampling, on_event, list(stop or []), logprobs)])[0]

    def submit_many(self, requests: list[Request]) -> list[Request]:
        """Queue ``requests`` together (the choices of one API call): all of them, or none
        (``QueueFull`` when fewer than ``len(requests)`` places are free)."""
        if self.closing:
            raise EngineClosed("the server is shutting down")
        for req in requests:
            if not req.prompt_ids:
                raise ValueError("the prompt has no tokens")
            if len(req.prompt_ids) + req.sampling.max_new_tokens > self.window:
                raise ValueError(f"{len(req.prompt_ids)} prompt tokens + {req.sampling.max_new_tokens} new tokens "
                                 f"exceed the model's context of {self.window} tokens")
        with self._lock:  # only the worker takes from the queue: the room counted here stays free
            if self.config.max_queue - self._queue.qsize() < len(requests):
                self.stats.rejected += 1
                raise QueueFull(f"the queue is full (max_queue={self.config.max_queue}); retry later")
            for req in requests:
                self._queue.put_nowait(req)
            self.stats.requests += len(requests)
        return requests

    # ------------------------------------------------------------------ worker

    def _next(self, timeout: float) -> Request | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self) -> list[Request]:
        first = self._next(0.05)
        if first is None:
            return []
        batch = [first]
        longest, most_new = len(first.prompt_ids), first.sampling.max_new_tokens
        deadline = time.perf_counter() + self.config.batch_wait_ms / 1000
        skipped: list[Request] = []
        while len(batch) < self.config.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 and not self._held and self._queue.empty():
                break
            req = self._next(max(remaining, 0.0))
            if req is None:
                break
            if max(longest, len(req.prompt_ids)) + max(most_new, req.sampling.max_new_tokens) > self.window:
                skipped.append(req)  # fits alone, not with these: first in line for the next batch
                if len(skipped) >= self.config.max_batch_size:
                    break
                continue
            batch.append(req)
            longest, most_new = max(longest, len(req.prompt_ids)), max(most_new, req.sampling.max_new_tokens)
        self._held.extendleft(reversed(skipped))
        return [r for r in batch if not r.cancelled.is_set()]

    def _run(self) -> None:
        while True:
            if self._closing.is_set() and not self._held and self._queue.empty():
                return
            batch = self._gather()
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Request]) -> None:
        streams = [ReplyStream(self.tokenizer, r.prompt_ids, r.stop, r.logprobs) for r in batch]
        vocab = self.tokenizer.vocab_size
        try:
            dec = BatchDecoder(self.model, [r.prompt_ids for r in batch], [r.sampling for r in batch],
                               self.tokenizer.vocab_size, self.tokenizer.eod_id)
            with self._lock:
                self.stats.batches += 1
                self.stats.batched_requests += len(batch)
            while not dec.done:
                for row, req in enumerate(batch):
                    if req.cancelled.is_set():
                        dec.finish(row, "cancelled")
                tokens = dec.step()
                logprobs = None
                if any(r.logprobs is not None for r in batch):
                    logprobs = torch.log_softmax(dec.last_logits[:, :vocab], dim=-1)  # (B, V) padding rows out
                for row, (req, tok) in enumerate(zip(batch, tokens)):
                    if tok is None:
                        continue
                    if req.first_token_at is None:
                        req.first_token_at = time.perf_counter()
                    piece, stopped = streams[row].push(tok, None if logprobs is None else logprobs[row])
                    if piece is not None:
                        req.on_event(("text", piece))
                    if stopped:
                        dec.finish(row, "stop")
                with self._lock:
                    self.stats.tokens += sum(t is not None for t in tokens)
        except Exception as e:  # one bad batch must not stop the server
            log.exception("decoding a batch of %d failed", len(batch))
            with self._lock:
                self.stats.failed += len(batch)
            for req in batch:
                req.on_event(("error", f"{type(e).__name__}: {e}"))
            return
        for row, req in enumerate(batch):
            rest = streams[row].flush()
            if rest is not None:
                req.on_event(("text", rest))
            reason = dec.finish_reason[row]
            req.on_event(("done", {"finish_reason": "stop" if reason == "cancelled" else reason,
                                   "prompt_tokens": len(req.prompt_ids),
                                   "completion_tokens": len(streams[row].ids)}))
        with self._lock:
            self.stats.completed += len(batch)
