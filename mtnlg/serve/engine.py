"""The serving engine: requests from many clients decoded together on one model.

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=8, max_queue=64))
    engine.start()
    handle = engine.submit(prompt_ids, sampling, stop=["\\n\\n"], on_event=callback)  # or QueueFull
    handles = engine.submit_many([Request(...), Request(...)])   # all accepted, or none
    ...
    engine.close()   # finishes what was accepted, then stops

Continuous (iteration-level) batching. One worker thread owns the model and a running
batch of up to ``max_batch_size`` requests, each in a slot of a preallocated key/value
cache (:class:`~mtnlg.serve.slots.SlotCache`). Every decoding step is one forward pass
that gives each running request its next token; between steps, requests that finished
leave (their slot is free at once) and waiting ones join: their prompts run through the
model in prefill passes (up to ``max_prefill_tokens`` of prompt between two steps; a longer
prompt in chunks over several steps) and their first token is drawn from them. A short
request beside long ones therefore takes about the steps it needs, not the longest one's.
When the engine is idle, the first request waits up to ``batch_wait_ms`` for others to
start with it. Waiting requests are bounded (``max_queue``): past that ``submit`` raises
``QueueFull``, which the HTTP layer answers with 429.

Each request's tokens are those one-sequence generation gives it alone (greedy: the same
ids; sampled: the same draws from its own seeded generator), whoever runs beside it.

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
from mtnlg.model.decode import continuation_text
from mtnlg.model.gpt import KVCache
from mtnlg.model.sampling import SamplingConfig, adjust_logits, sample_next_token
from mtnlg.progress import get_logger
from mtnlg.serve.slots import SlotCache, mask_padding

log = get_logger("mtnlg.serve")

Event = tuple[str, object]


class QueueFull(Exception):
    """The engine already holds ``max_queue`` waiting requests."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class EngineConfig(Config):
    # requests decoded together: the slots of the running batch
    max_batch_size: int = field(default=8, metadata={"min": 1})
    # requests waiting for a slot; more are refused (HTTP 429)
    max_queue: int = field(default=64, metadata={"min": 1})
    # when idle, how long the first request waits for company
    batch_wait_ms: float = field(default=20.0, metadata={"min": 0.0})
    # prompt tokens run between two decoding steps; a longer prompt runs in chunks over several
    max_prefill_tokens: int = field(default=256, metadata={"min": 1})


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
    batches: int = 0           # admissions: steps at which requests joined the running batch
    batched_requests: int = 0  # requests that joined it
    steps: int = 0             # decoding steps (one forward pass each)
    row_steps: int = 0         # running requests summed over the steps
    tokens: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_batch_size"] = self.row_steps / self.steps if self.steps else 0.0
        return d


class _Row:
    """A running request: its stream, sampling state and the token to feed next."""

    def __init__(self, req: Request, tokenizer, device: torch.device):
        self.req, self.s = req, req.sampling
        self.stream = ReplyStream(tokenizer, req.prompt_ids, req.stop, req.logprobs)
        self.history = list(req.prompt_ids)
        self.generated = 0
        self.pending = 0
        self.reason: str | None = None
        self.generator = None
        if self.s.seed is not None and self.s.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(self.s.seed))

    @property
    def plain_greedy(self) -> bool:
        """Its next token is the argmax of the logits as they are (no penalty, no eod ban)."""
        return (self.s.temperature == 0 and self.s.repetition_penalty == 1.0
                and self.generated >= self.s.min_new_tokens)


@dataclass
class _Filling:
    """A request whose prompt runs through the model in chunks, into a cache of its own."""

    req: Request
    cache: KVCache


def _similar_lengths(reqs: list[Request], waste: float = 0.2) -> list[list[Request]]:
    """``reqs`` in groups of similar prompt lengths, shortest first: in each group, padding
    to the longest is at most ``waste`` of the tokens run."""
    groups: list[list[Request]] = []
    for req in sorted(reqs, key=lambda r: len(r.prompt_ids)):
        g = groups[-1] if groups else None
        longest = len(req.prompt_ids)  # sorted: the new one is the longest
        if g is not None and (len(g) + 1) * longest * (1 - waste) <= sum(len(r.prompt_ids) for r in g) + longest:
            g.append(req)
        else:
            groups.append([req])
    return groups


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or EngineConfig()
        self.window = model.cfg.seq_length
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=self.config.max_queue)
        self._held: collections.deque[Request] = collections.deque()  # taken from the queue, not yet admitted
        self._slots = SlotCache(model, self.config.max_batch_size)
        self._rows: list[_Row] = []   # _rows[b] runs in slot row b
        self._joining: list[list[Request]] = []  # admitted, their prefill still to come
        self._filling: _Filling | None = None    # admitted, its long prompt being run in chunks
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

    @property
    def occupancy(self) -> int:
        """Requests in the running batch now."""
        return len(self._rows)

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

    def _take(self, timeout: float | None) -> Request | None:
        """The oldest waiting request; ``timeout`` None: do not wait."""
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get_nowait() if timeout is None else self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _wait_for_company(self) -> bool:
        """Idle: wait for a request, then up to ``batch_wait_ms`` for more to start with it."""
        first = self._take(0.05)
        if first is None:
            return False
        self._held.appendleft(first)
        deadline = time.perf_counter() + self.config.batch_wait_ms / 1000
        while len(self._held) < self.config.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                self._held.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return True

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                if not self._rows and self._filling is None:
                    if self._closing.is_set() and not self._held and self._queue.empty():
                        return
                    if not self._wait_for_company():
                        continue
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as e:  # one bad step must not stop the server
                    self._fail(e)

    def _admit(self) -> None:
        """Waiting requests join while slots are free, at most ``max_prefill_tokens`` of
        prompt run per step. A prompt that does not fit what is left of that is run in
        chunks over the next steps (one such prompt at a time), so a long prompt never
        holds the running requests for more than one step's budget. Prompts of similar
        lengths are prefilled together (at most a fifth of a pass is padding)."""
        budget = self.config.max_prefill_tokens
        if self._filling is not None:
            budget -= self._fill(budget)
        new: list[Request] = []
        total = 0
        while len(self._rows) + (self._filling is not None) + len(new) < self.config.max_batch_size:
            if total >= budget:
                break
            req = self._take(None)
            if req is None:
                break
            if req.cancelled.is_set():
                continue  # the client has gone before it started
            if req.sampling.max_new_tokens == 0:
                self._done(_Row(req, self.tokenizer, self.device), "length")
                continue
            if total + len(req.prompt_ids) > budget:
                if self._filling is not None:
                    self._held.appendleft(req)  # first in line at the next step
                    break
                self._count_admitted(1)
                self._filling = _Filling(req, KVCache(self.model.cfg.num_layers, 1, len(req.prompt_ids)))
                budget -= self._fill(budget - total)
                continue
            new.append(req)
            total += len(req.prompt_ids)
        if not new:
            return
        self._count_admitted(len(new))
        filler = self.tokenizer.eod_id if self.tokenizer.eod_id is not None else 0
        self._joining = _similar_lengths(new)
        while self._joining:
            group = self._joining.pop(0)
            rows = [_Row(r, self.tokenizer, self.device) for r in group]
            self._rows.extend(rows)
            logits = self._slots.prefill(self.model, [r.prompt_ids for r in group], filler)  # (k, V_padded)
            self._advance(rows, logits)

    def _count_admitted(self, k: int) -> None:
        with self._lock:
            self.stats.batches += 1
            self.stats.batched_requests += k

    def _fill(self, limit: int) -> int:
        """Run up to ``limit`` more tokens of the prompt being filled; when it is whole, the
        request takes a slot and draws its first token. Returns the tokens run."""
        f = self._filling
        if f.req.cancelled.is_set():
            self._filling = None
            self._done(_Row(f.req, self.tokenizer, self.device), "cancelled")
            return 0
        ids = f.req.prompt_ids[f.cache.length:f.cache.length + max(0, limit)]
        if not ids:
            return 0
        x = torch.tensor([ids], dtype=torch.long, device=self.device)                      # (1, t)
        logits = self.model(x, cache=f.cache)                                               # (1, t, V_padded)
        if f.cache.length == len(f.req.prompt_ids):
            self._filling = None
            row = _Row(f.req, self.tokenizer, self.device)
            self._rows.append(row)
            self._slots.join(f.cache, [0])
            self._advance([row], logits[:, -1, :])
        return len(ids)

    def _step(self) -> None:
        for row in self._rows:
            if row.req.cancelled.is_set():
                row.reason = "cancelled"
        self._release_finished()
        if not self._rows:
            return
        logits = self._slots.step(self.model, [r.pending for r in self._rows])             # (n, V_padded)
        with self._lock:
            self.stats.steps += 1
            self.stats.row_steps += len(self._rows)
        self._advance(list(self._rows), logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits (len(rows), V_padded), hand out the
        text, and let the rows that finished leave."""
        vocab = self.tokenizer.vocab_size
        last = mask_padding(logits.float(), vocab)                                          # (k, V_padded)
        logprobs = None
        if any(r.req.logprobs is not None for r in rows):
            logprobs = torch.log_softmax(last[:, :vocab], dim=-1)                           # (k, V) padding out
        tokens = self._sample(rows, last)
        eod = self.tokenizer.eod_id
        now = time.perf_counter()
        new_tokens = 0
        for i, (row, tok) in enumerate(zip(rows, tokens)):
            req = row.req
            if req.first_token_at is None:
                req.first_token_at = now
            if row.s.stop_at_eod and eod is not None and tok == eod:
                row.reason = "stop"
                continue
            row.generated += 1
            new_tokens += 1
            row.history.append(tok)
            row.pending = tok
            piece, stopped = row.stream.push(tok, None if logprobs is None else logprobs[i])
            if piece is not None:
                req.on_event(("text", piece))
            if stopped:
                row.reason = "stop"
            elif row.generated >= row.s.max_new_tokens:
                row.reason = "length"
        with self._lock:
            self.stats.tokens += new_tokens
        self._release_finished()

    def _sample(self, rows: list[_Row], last: torch.Tensor) -> list[int]:
        """The same choice per row as one-sequence generation; plain greedy rows at once."""
        out = torch.argmax(last, dim=-1).tolist()                                           # (k,)
        for i, row in enumerate(rows):
            if not row.plain_greedy:
                adjusted = adjust_logits(last[i], row.history, row.generated, row.s, self.tokenizer.eod_id)
                out[i] = int(sample_next_token(adjusted[None], row.s.temperature, row.s.top_k, row.s.top_p,
                                               row.generator)[0])
        return out

    def _release_finished(self) -> None:
        b = len(self._rows) - 1
        while b >= 0:  # from the end: a released row's place is taken by the last one
            row = self._rows[b]
            if row.reason is not None:
                self._slots.release(b)
                self._rows[b] = self._rows[-1]
                self._rows.pop()
                self._done(row, row.reason)
            b -= 1

    def _done(self, row: _Row, reason: str) -> None:
        rest = row.stream.flush()
        if rest is not None:
            row.req.on_event(("text", rest))
        row.req.on_event(("done", {"finish_reason": "stop" if reason == "cancelled" else reason,
                                   "prompt_tokens": len(row.req.prompt_ids),
                                   "completion_tokens": len(row.stream.ids)}))
        with self._lock:
            self.stats.completed += 1

    def _fail(self, e: Exception) -> None:
        """A step or prefill failed: every running and joining request gets the error."""
        log.exception("a decoding step of %d requests failed", len(self._rows))
        reqs = [row.req for row in self._rows] + [r for group in self._joining for r in group]
        if self._filling is not None:
            reqs.append(self._filling.req)
        self._rows, self._joining, self._filling = [], [], None
        self._slots.reset()
        with self._lock:
            self.stats.failed += len(reqs)
        for req in reqs:
            req.on_event(("error", f"{type(e).__name__}: {e}"))
