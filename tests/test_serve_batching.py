"""Continuous batching in ``mtnlg serve``'s engine: requests join and leave the running
batch at every step, each gets the tokens it gets alone, a short request beside long ones
is not held by them, and the key/value memory stays the slots it was given."""

from __future__ import annotations

import threading

import pytest
import torch

from mtnlg.model.config import ModelConfig
from mtnlg.model.decode import generate_ids
from mtnlg.model.gpt import GPT
from mtnlg.model.sampling import SamplingConfig
from mtnlg.serve.engine import Engine, EngineConfig, Request
from mtnlg.serve.slots import SlotCache

pytestmark = pytest.mark.unit

VOCAB, EOD = 120, 1
VARIANTS = {
    "gpt2": {},
    "llama-gqa": dict(position="rotary", norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                      tie_embeddings=False, bias=False),
    "sinusoidal": dict(position="sinusoidal"),
}


class WordTokenizer:
    """Token ``i`` reads `` w<i>``: enough for the engine's text streams."""

    vocab_size, eod_id = VOCAB, EOD

    def decode(self, ids):
        return "".join(f" w{i}" for i in ids)


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_length=48, vocab_size=VOCAB, **kw)).eval()


class Collector:
    """Requests submitted to an engine: each one's token ids (from its logprob records),
    its done payload, and the engine's step count when its first text and its end came."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokens: dict[object, list[int]] = {}
        self.done: dict[object, tuple] = {}
        self.first_step: dict[object, int] = {}
        self.done_step: dict[object, int] = {}
        self.cv = threading.Condition()

    def submit(self, key, prompt, sampling, then=None, **kw) -> Request:
        """``then(tokens_so_far)``: called from the engine's worker after each text event."""
        self.tokens[key] = []

        def on_event(ev):
            with self.cv:
                if ev[0] == "text":
                    self.first_step.setdefault(key, self.engine.stats.steps)
                    self.tokens[key].extend(t.id for t in ev[1].tokens)
                else:
                    self.done[key], self.done_step[key] = ev, self.engine.stats.steps
                    self.cv.notify_all()
            if then is not None and ev[0] == "text":
                then(self.tokens[key])
        req = Request(list(prompt), sampling, on_event, logprobs=0, **kw)
        self.engine.submit_many([req])
        return req

    def wait(self, keys, timeout: float = 60) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: all(k in self.done for k in keys), timeout), \
                f"{sorted(self.done)} finished, waited for {sorted(keys)}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_requests_joining_and_leaving_get_the_tokens_they_get_alone(variant):
    """Seven requests of different prompt lengths and output lengths on three slots: they
    join as slots free up, the shared clock passes the 48-position window (the rows shift
    left), and each gets exactly the ids of one-sequence generation (greedy, seeded
    sampling, repetition penalty, min_tokens, the end of document)."""
    model = tiny_model(**VARIANTS[variant])
    jobs = [([5, 9, 11, 3, 7, 2, 8], SamplingConfig(max_new_tokens=30, stop_at_eod=False)),
            ([4], SamplingConfig(max_new_tokens=3, stop_at_eod=False)),
            ([10, 20, 30, 40] * 5, SamplingConfig(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=3,
                                                   stop_at_eod=False)),
            ([6, 6], SamplingConfig(max_new_tokens=12, repetition_penalty=1.3, stop_at_eod=False)),
            ([7] * 30, SamplingConfig(max_new_tokens=17, temperature=1.2, top_k=20, seed=11)),
            ([3, 2], SamplingConfig(max_new_tokens=25, min_new_tokens=4)),
            ([8, 9, 10], SamplingConfig(max_new_tokens=9, stop_at_eod=False))]
    engine = Engine(model, WordTokenizer(), EngineConfig(max_batch_size=3, max_queue=16, batch_wait_ms=0,
                                                         max_prefill_tokens=24)).start()
    c = Collector(engine)
    try:
        for i, (p, s) in enumerate(jobs):
            c.submit(i, p, s)
        c.wait(range(len(jobs)))
    finally:
        engine.close()
    for i, (p, s) in enumerate(jobs):
        want = generate_ids(model, p, s, vocab_size=VOCAB, eod_id=EOD)
        assert c.tokens[i] == want, f"request {i}"
        kind, payload = c.done[i]
        assert kind == "done" and payload["completion_tokens"] == len(want)
        assert payload["finish_reason"] == ("length" if len(want) == s.max_new_tokens else "stop")
    assert engine.stats.batched_requests == len(jobs) and engine.stats.failed == 0
    assert 2 < engine.stats.as_dict()["mean_batch_size"] <= 3  # the slots stayed busy
    assert engine._slots.shifts > 0  # the clock passed the window at least once


def test_a_short_request_does_not_wait_for_the_long_ones_beside_it():
    """A short request arriving while long ones run joins at the next step and leaves when
    its own tokens are done, many steps before the long ones end."""
    model = tiny_model()
    engine = Engine(model, WordTokenizer(), EngineConfig(max_batch_size=4, batch_wait_ms=0)).start()
    c = Collector(engine)
    long = SamplingConfig(max_new_tokens=40, stop_at_eod=False)
    short = SamplingConfig(max_new_tokens=4, stop_at_eod=False)

    occupancy = []

    def arrive(tokens):  # the short request arrives while the long ones are 5 tokens in
        if len(tokens) == 5:
            c.submit("short", [9, 9, 9, 9], short, then=lambda _: occupancy.append(engine.occupancy))
    try:
        c.submit(("long", 0), [5, 6, 7], long, then=arrive)
        c.submit(("long", 1), [6, 6, 7], long)
        c.wait(["short", ("long", 0), ("long", 1)])
    finally:
        engine.close()
    assert c.done["short"][1]["completion_tokens"] == 4
    assert occupancy[0] == 3  # it ran beside both long requests
    assert c.done_step["short"] - c.first_step["short"] <= 3          # its first token came from the prefill
    assert c.done_step["short"] < c.done_step[("long", 0)] - 20        # it left long before they did
    assert c.tokens["short"] == generate_ids(model, [9, 9, 9, 9], short, vocab_size=VOCAB, eod_id=EOD)


def test_the_slot_cache_is_allocated_once_and_rows_move_when_one_leaves():
    """The key/value storage is slots x window per layer, made at the first prefill and
    never grown; a finished row's slot is taken by the last one, whose logits go on as
    they were; a row joining later than the clock's start lands at its end."""
    model = tiny_model(position="rotary", norm="rmsnorm")
    cache = SlotCache(model, slots=3)
    with torch.no_grad():
        first = cache.prefill(model, [[5, 9, 11, 3], [4, 6]], filler=EOD)            # (2, V)
        storage = [t.data_ptr() for t in cache.keys]
        assert tuple(cache.keys[0].shape[:2]) == (3, 48) and cache.n == 2 and cache.length == 4
        assert cache.pad[:2].tolist() == [0, 2]
        alone = model(torch.tensor([[4, 6]]))[0, -1]
        assert torch.allclose(first[1], alone, atol=1e-5)
        cache.step(model, [7, 8])                                                     # clock 5
        later = cache.prefill(model, [[2, 3, 4, 5, 6, 7, 8]], filler=EOD)             # longer than the clock
        assert cache.n == 3 and cache.length == 7 and cache.pad[:3].tolist() == [2, 4, 0]
        assert cache.release(0) == 2                                                  # row 2 moved to row 0
        logits = cache.step(model, [9, 8])                                            # rows: the late one, [4, 6, 8]
        assert torch.allclose(logits[0], model(torch.tensor([[2, 3, 4, 5, 6, 7, 8, 9]]))[0, -1], atol=1e-5)
        assert torch.allclose(logits[1], model(torch.tensor([[4, 6, 8, 8]]))[0, -1], atol=1e-5)
        assert [t.data_ptr() for t in cache.keys] == storage
    assert later.shape == first[:1].shape


class FailsOnLength(torch.nn.Module):
    """The model, except that a forward pass of ``length`` positions raises."""

    def __init__(self, inner: GPT, length: int):
        super().__init__()
        self.inner, self.cfg, self.length = inner, inner.cfg, length

    def forward(self, tokens, cache=None):
        if tokens.shape[1] == self.length:
            raise RuntimeError("the device fell over")
        return self.inner(tokens, cache=cache)


def test_a_failed_prefill_fails_the_running_and_joining_requests_and_the_engine_goes_on():
    """Three requests join together (the idle engine waits 500 ms for company): prompts of
    3, 13 and 30 tokens, prefilled apart in that order. The second prefill raises: the
    first (already running) and the third (still to join) fail with it, and the engine
    serves the next request as if nothing had happened."""
    model = FailsOnLength(tiny_model(), length=13)
    engine = Engine(model, WordTokenizer(), EngineConfig(max_batch_size=4, batch_wait_ms=500)).start()
    c = Collector(engine)
    s = SamplingConfig(max_new_tokens=8, stop_at_eod=False)
    names = ("running", "failing", "joining")
    try:
        for name, prompt in zip(names, ([3] * 3, [4] * 13, [5] * 30)):
            c.submit(name, prompt, s)
        c.wait(names)
        c.submit("after", [6, 7], s)
        c.wait(["after"])
    finally:
        engine.close()
    assert [c.done[k][0] for k in names] == ["error"] * 3
    assert "the device fell over" in c.done["failing"][1]
    assert c.done["after"][0] == "done" and c.tokens["after"] == generate_ids(model.inner, [6, 7], s, VOCAB, EOD)
    assert engine.stats.failed == 3 and engine.stats.completed == 1


class Recording(torch.nn.Module):
    """The model, noting the positions of each forward pass."""

    def __init__(self, inner: GPT):
        super().__init__()
        self.inner, self.cfg, self.calls = inner, inner.cfg, []

    def forward(self, tokens, cache=None):
        self.calls.append(tuple(tokens.shape))
        return self.inner(tokens, cache=cache)


def test_a_long_prompt_runs_in_chunks_between_the_steps_of_the_running_requests():
    """With 8 prompt tokens per step, a 30-token prompt joining a running request is run
    8 + 8 + 8 + 6, each chunk followed by a step of the running one; both get their tokens."""
    model = Recording(tiny_model(position="rotary", norm="rmsnorm"))
    engine = Engine(model, WordTokenizer(), EngineConfig(max_batch_size=4, batch_wait_ms=0,
                                                         max_prefill_tokens=8)).start()
    c = Collector(engine)
    s = SamplingConfig(max_new_tokens=12, stop_at_eod=False)

    def arrive(tokens):
        if len(tokens) == 2:
            c.submit("long prompt", list(range(10, 40)), s)
    try:
        c.submit("running", [3, 4], s, then=arrive)
        c.wait(["running", "long prompt"])
    finally:
        engine.close()
    chunks = [t for _, t in model.calls if t > 1]
    assert chunks == [2, 8, 8, 8, 6]                          # the first prompt whole, the long one in 4
    start = model.calls.index((1, 8))
    assert model.calls[start:start + 8] == [(1, 8), (1, 1), (1, 8), (1, 1), (1, 8), (1, 1), (1, 6), (2, 1)]
    for key, prompt in (("running", [3, 4]), ("long prompt", list(range(10, 40)))):
        assert c.tokens[key] == generate_ids(model.inner, prompt, s, vocab_size=VOCAB, eod_id=EOD), key
