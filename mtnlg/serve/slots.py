"""The running batch of continuous batching: a fixed set of key/value-cache slots that
requests take when they start and give back when they finish, at any decoding step.

    cache = SlotCache(model, slots=8)
    first_logits = cache.prefill(model, [ids_a, ids_b], filler=eod_id)   # rows n, n+1 join
    cache.join(own, pads=[0])                                           # or: a KVCache filled elsewhere
    logits = cache.step(model, next_tokens)                             # (n, V_padded), one token per row
    cache.release(row)                                                  # the row's request has finished

Storage is ``slots`` rows x ``seq_length`` positions of keys and values per layer,
allocated once: the KV memory is bounded by the slots, whatever the traffic. The running
requests hold rows ``0 .. n-1`` (a finishing row's place is taken by the last row), so each
step runs one forward pass over exactly the requests in flight.

The rows share one clock: every running sequence ends at slot ``length``, and row ``b``'s
tokens fill slots ``pad[b] .. length-1``, with ``pad[b]`` leading slots of padding. That is
the left-padded layout of the model's own ``KVCache`` (``model.gpt.KVCache``: positions count
from each row's first real token, padding is never attended to), so a step is the model's
ordinary cached forward pass over a view of the first ``n`` rows, and each row's logits are
those it would get alone. A joining request's prompt runs through the model in a prefill
pass of its own (or several: the engine runs a long prompt in chunks between steps) and
its keys and values are copied to the end of a free row, ending at the clock. When the
clock would pass the window, or when at least half of every row is padding, all rows
shift left by the smallest padding (``compact``): one copy, and since
each request fits the window alone (``prompt + max_tokens <= seq_length``), it always fits
after the shift.
"""

from __future__ import annotations

import torch

from mtnlg.model.gpt import KVCache


def mask_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padding ids (>= the tokenizer's vocabulary) are never generated.  (B, V_padded)."""
    if logits.shape[-1] > vocab_size:
        logits = logits.clone()
        logits[..., vocab_size:] = float("-inf")
    return logits


class SlotCache:
    def __init__(self, model: torch.nn.Module, slots: int):
        self.num_layers, self.window, self.slots = model.cfg.num_layers, model.cfg.seq_length, slots
        self.keys: list[torch.Tensor] = []    # per layer (slots, window, nkv, hd), made at the first prefill
        self.values: list[torch.Tensor] = []
        self.pad = torch.zeros(slots, dtype=torch.long)
        self.length = 0  # the clock: every running row ends here
        self.n = 0       # rows 0 .. n-1 are running
        self.shifts = 0  # times the rows moved (compact, or room for a longer prompt)

    @property
    def free(self) -> int:
        return self.slots - self.n

    def _view(self, rows: slice) -> KVCache:
        """The model's ``KVCache`` over ``rows`` of the storage (writes land in the storage)."""
        count = len(range(*rows.indices(self.slots)))
        kv = KVCache(self.num_layers, count, self.window, pad=self.pad[rows])
        kv.keys = [k[rows] for k in self.keys]
        kv.values = [v[rows] for v in self.values]
        kv.length = self.length
        return kv

    def _shift(self, delta: int) -> None:
        """Move every running row's tokens ``delta`` slots (left when negative)."""
        if delta == 0 or self.n == 0:
            self.length = max(self.length + delta, 0)
            return
        L, n = self.length, self.n
        self.shifts += 1
        lo = max(0, -delta)  # the slots that hold someone's tokens: lo .. L-1 (padding below pad is never read)
        for store in (self.keys, self.values):
            for t in store:
                t[:n, lo + delta:L + delta] = t[:n, lo:L].clone()
        self.pad[:n] += delta
        self.length = L + delta

    def compact(self) -> None:
        """Shift left by the smallest padding when the next token would not fit, or when
        half of the attended slots are padding (attention reads ``length`` slots per row)."""
        if self.n == 0:
            self.length = 0
            return
        least = int(self.pad[:self.n].min())
        if least > 0 and (self.length + 1 > self.window or 2 * least >= self.length):
            self._shift(-least)

    @torch.no_grad()
    def prefill(self, model: torch.nn.Module, prompts: list[list[int]], filler: int) -> torch.Tensor:
        """Run ``prompts`` (left-padded to the longest; a request alone gets no padding, the
        path of one-sequence generation) and give them rows ``n .. n+k-1``. Returns their
        next-token logits (k, V_padded)."""
        k, longest = len(prompts), max(map(len, prompts))
        if k > self.free:
            raise ValueError(f"{k} prompts but {self.free} free slots")
        device = next(model.parameters()).device
        pads = [longest - len(p) for p in prompts]
        own = KVCache(self.num_layers, k, longest,
                      pad=torch.tensor(pads, dtype=torch.long, device=device) if any(pads) else None)
        x = torch.tensor([[filler] * q + list(p) for q, p in zip(pads, prompts)], dtype=torch.long, device=device)
        logits = model(x, cache=own)                                                 # (k, longest, V_padded)
        self.join(own, pads)
        return logits[:, -1, :]                                                      # (k, V_padded)

    def join(self, own: KVCache, pads: list[int]) -> None:
        """Give the sequences of a filled ``KVCache`` (``own.length`` positions, ``pads[j]``
        of them leading padding) rows ``n .. n+k-1``, ending at the clock."""
        k, longest = len(pads), own.length
        if k > self.free:
            raise ValueError(f"{k} sequences but {self.free} free slots")
        if not self.keys:
            shape = (self.slots, self.window, *own.keys[0].shape[2:])                # (S, window, nkv, hd)
            self.keys = [torch.zeros(shape, dtype=t.dtype, device=t.device) for t in own.keys]
            self.values = [torch.zeros(shape, dtype=t.dtype, device=t.device) for t in own.values]
            self.pad = self.pad.to(own.keys[0].device)
        if self.n == 0:
            self.length = longest
        elif self.length < longest:
            self._shift(longest - self.length)  # make room in front: every row still ends at the clock
        start, rows = self.length - longest, slice(self.n, self.n + k)
        for store, fresh in ((self.keys, own.keys), (self.values, own.values)):
            for t, f in zip(store, fresh):
                t[rows, start:self.length] = f[:, :longest]
        self.pad[rows] = start + torch.tensor(pads, dtype=torch.long, device=self.pad.device)
        self.n += k

    @torch.no_grad()
    def step(self, model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
        """One new token for each running row (``tokens[b]`` continues row ``b``): one
        forward pass. Returns the next-token logits (n, V_padded)."""
        if len(tokens) != self.n:
            raise ValueError(f"{len(tokens)} tokens for {self.n} running rows")
        self.compact()
        kv = self._view(slice(0, self.n))
        x = torch.tensor(tokens, dtype=torch.long, device=self.pad.device)[:, None]  # (n, 1)
        logits = model(x, cache=kv)                                                  # (n, 1, V_padded)
        self.length = kv.length
        return logits[:, -1, :]                                                      # (n, V_padded)

    def release(self, row: int) -> int | None:
        """Row ``row`` has finished: the last running row moves into its place. Returns the
        row that moved there (its old index is ``n`` afterwards), or None if none did."""
        if not 0 <= row < self.n:
            raise IndexError(f"row {row} is not running ({self.n} are)")
        last = self.n - 1
        if row != last:
            for store in (self.keys, self.values):
                for t in store:
                    t[row, :self.length] = t[last, :self.length]
            self.pad[row] = self.pad[last]
        self.n -= 1
        if self.n == 0:
            self.length = 0
        return last if row != last else None

    def reset(self) -> None:
        """Drop every row (after a failed step)."""
        self.n, self.length = 0, 0
