"""``mtnlg serve``: the OpenAI-compatible server, talked to with the official ``openai``
client on 127.0.0.1 (completions, chat, streaming, errors, the bounded queue, batching).
The rest of the API is in tests/test_serve_api.py, operations (the API key, limits, the
drain on SIGTERM, metrics) in tests/test_serve_ops.py; both reuse this module's tiny model."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from corpus_data import tokenized_dir

from mtnlg.model.config import ModelConfig
from mtnlg.model.decode import generate, generate_ids, prompt_ids_for
from mtnlg.model.gpt import GPT
from mtnlg.model.sampling import SamplingConfig

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

WORDS = ("list dict tuple set append insert pop sort key value function module package class method "
         "return yield import raise except").split()
NAME = "tiny-gpt"


_BUILT: dict[str, str] = {}  # the tiny model, built once per session for every tests/test_serve*.py module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    if NAME not in _BUILT:
        _BUILT[NAME] = _tiny_model(tmp_path_factory)
    return _BUILT[NAME]


def _tiny_model(tmp_path_factory) -> str:
    from mtnlg.formats.fused import save_fused
    from mtnlg.formats.tokenizer import Tokenizer

    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=30)) + "." for _ in range(120)]
    tok_dir = tokenized_dir(tmp_path_factory.mktemp("servedata"), docs[:100], docs[100:], vocab_size=400)
    tok = Tokenizer.from_dir(tok_dir)
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_length=128, vocab_size=tok.vocab_size))
    out = str(tmp_path_factory.mktemp("model") / NAME)
    save_fused(model, out, tok)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """The app under uvicorn in a thread of this process, on a free 127.0.0.1 port."""

    def __init__(self, model_dir: str, **engine_config):
        from mtnlg.serve.server import build_app

        self.app = build_app(model_dir, NAME, **engine_config)
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(model_dir):
    with ServerThread(model_dir, max_batch_size=8, max_queue=64, batch_wait_ms=20) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local_model(model_dir):
    from mtnlg.formats.fused import load_fused

    model, _, tok = load_fused(model_dir)
    return model, tok


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == NAME


def test_completion_equals_local_greedy_generation(client, local_model):
    model, tok = local_model
    prompt = "append the key"
    want = generate(model, tok, prompt, max_new_tokens=12, temperature=0.0)
    ids = generate_ids(model, prompt_ids_for(tok, prompt), SamplingConfig(max_new_tokens=12), tok.vocab_size,
                       tok.eod_id)
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    choice = got.choices[0]
    # the server keeps the space between prompt and continuation; generate() decodes the new ids alone
    assert choice.text.strip() == want.strip() and choice.text
    assert got.usage.completion_tokens == len(ids)
    assert got.usage.prompt_tokens == len(prompt_ids_for(tok, prompt))
    assert choice.finish_reason == ("length" if len(ids) == 12 else "stop")  # 12 tokens, or the end of document
    echo = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == prompt + choice.text


def test_seeded_sampling_is_reproducible_and_streaming_matches(client):
    kw = dict(model=NAME, prompt="sort the list", max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    first = client.completions.create(**kw)
    a = first.choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    reason = "length" if first.usage.completion_tokens == 20 else "stop"  # 20 tokens, or the end of document
    assert first.choices[0].finish_reason == reason
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == a
    assert chunks[-1].choices[0].finish_reason == reason
    assert len(chunks) >= 3  # the text came in pieces, not at once


def test_stop_sequences_cut_the_text(client):
    full = client.completions.create(model=NAME, prompt="import the module", max_tokens=30, temperature=0,
                                     extra_body={"min_tokens": 30}).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3
    got = client.completions.create(model=NAME, prompt="import the module", max_tokens=30, temperature=0,
                                    extra_body={"min_tokens": 30}, stop=[stop])
    assert got.choices[0].text == full[:full.find(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="import the module", max_tokens=30, temperature=0, extra_body={"min_tokens": 30}, stop=stop, stream=True))
    assert streamed == got.choices[0].text


@pytest.fixture(scope="module")
def eod_model_dir(model_dir, tmp_path_factory) -> str:
    """The served model changed so that end-of-document is always its first choice: the
    final norm outputs a constant vector that only the end-of-document embedding row
    (tied to the output) lines up with."""
    from mtnlg.formats.fused import load_fused, save_fused

    model, _, tok = load_fused(model_dir, decode_layout=False)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()
        model.norm.bias[0] = 1.0
        model.tok_embeddings.weight[tok.eod_id, 0] = 100.0             # logit 100; the others ~0.02
    out = str(tmp_path_factory.mktemp("eod-model") / NAME)
    save_fused(model, out, tok)
    return out


def test_finish_reason_is_stop_at_the_end_of_document_and_length_at_the_limit(eod_model_dir):
    """One batch: requests whose document ends (after min_tokens) before max_tokens say
    "stop", streamed or not, completion or chat; one that reaches max_tokens says "length"."""
    prompt, user = "sort the list", [{"role": "user", "content": "sort the list"}]
    # a batch of four, gathered for up to 2 s: every request lands in it
    with ServerThread(eod_model_dir, max_batch_size=4, max_queue=8, batch_wait_ms=2000) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        calls = {
            "eod": lambda: c.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12,
                                               extra_body={"min_tokens": 3}),
            "limit": lambda: c.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=5,
                                                 extra_body={"min_tokens": 5}),
            "stream": lambda: list(c.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12,
                                                        extra_body={"min_tokens": 3}, stream=True)),
            "chat": lambda: c.chat.completions.create(model=NAME, messages=user, temperature=0, max_tokens=12,
                                                      extra_body={"min_tokens": 2}),
        }
        got: dict[str, object] = {}
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, calls[k]())) for k in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got["eod"].choices[0].finish_reason == "stop" and got["eod"].usage.completion_tokens == 3
        assert got["limit"].choices[0].finish_reason == "length" and got["limit"].usage.completion_tokens == 5
        assert got["stream"][-1].choices[0].finish_reason == "stop"
        assert got["chat"].choices[0].finish_reason == "stop" and got["chat"].usage.completion_tokens == 2
        assert httpx.get(s.url + "/health").json()["batches"] == 1  # decoded side by side


def test_chat_completion_and_streaming(client):
    messages = [{"role": "system", "content": "You answer about the list."},
                {"role": "user", "content": "What does pop return"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0.8, seed=3)
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert "\nUser:" not in msg.content and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0.8,
                                                 seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == msg.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    # include_usage: a last chunk with the usage and no choices; every other chunk says usage null
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(model=NAME, prompt="   "), "prompt: must not be empty"),
    (dict(model=NAME, prompt="list", max_tokens=200), "maximum context length is 128 tokens"),
    (dict(model=NAME, prompt="list", extra_body={"temperature": "hot"}), "temperature"),
    (dict(model=NAME, prompt="list", extra_body={"colour": "blue"}), "colour: unknown field"),
    (dict(model=NAME, prompt="list", n=0), "n: Input should be greater than or equal to 1"),
    (dict(model=NAME, prompt=["a", " "]), "prompt: must not be empty"),
    (dict(model=NAME, prompt=[5, 100000]), "prompt: token id 100000 is outside the vocabulary"),
    (dict(model=NAME, prompt="list", n=65), "n: 65 choices exceed this server's queue of 64"),
    (dict(model=NAME, prompt="list", stop=["a", "b", "c", "d", "e"]), "stop: at most 4 sequences, got 5"),
    (dict(model=NAME, prompt="list", stream_options={"include_usage": True}), "stream_options: only allowed"),
    (dict(model=NAME, prompt="list", logprobs=21), "logprobs: Input should be less than or equal to 20"),
    (dict(model=NAME, prompt="list", max_tokens=0), "max_tokens: 0 is only allowed with echo"),
    (dict(model=NAME, prompt="list", max_tokens=4, extra_body={"min_tokens": 9}), "min_tokens=9 exceeds"),
])
def test_bad_requests_get_400_with_a_message(client, kwargs, match):
    with pytest.raises(openai.BadRequestError, match=match) as e:
        client.completions.create(**kwargs)
    assert e.value.status_code == 400 and e.value.body["message"]


def test_bad_chat_requests(client, server):
    with pytest.raises(openai.BadRequestError, match="messages.0.role"):
        client.chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="at least one message"):
        client.chat.completions.create(model=NAME, messages=[])
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, server, local_model):
    model, tok = local_model
    prompts = [f"{w} the {v}" for w, v in zip(WORDS[:8], WORDS[8:16])]
    want = [generate(model, tok, p, max_new_tokens=10).strip() for p in prompts]
    before = httpx.get(server.url + "/health").json()
    results: dict[int, str] = {}

    def ask(i):
        results[i] = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=10,
                                               temperature=0).choices[0].text.strip()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(8)] == want
    after = httpx.get(server.url + "/health").json()
    batches = after["batches"] - before["batches"]
    assert after["batched_requests"] - before["batched_requests"] == 8
    assert batches < 8, f"8 concurrent requests ran in {batches} batches: nothing was batched"


def test_full_queue_answers_429(model_dir, local_model):
    """A queue of 1 behind a batch of 1: the third concurrent request is refused."""
    with ServerThread(model_dir, max_batch_size=1, max_queue=1, batch_wait_ms=0) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        codes: list[int] = []
        refusals: list[openai.RateLimitError] = []
        lock = threading.Lock()

        def ask():
            try:
                c.completions.create(model=NAME, prompt="list", max_tokens=40, extra_body={"min_tokens": 40}, temperature=0)
                code = 200
            except openai.RateLimitError as e:
                code = e.status_code
                refusals.append(e)
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(codes)[0] == 200 and 429 in codes, codes
        for e in refusals:  # OpenAI's shape, and when to come back
            assert e.response.headers["retry-after"] == "1"
            assert e.body == {"message": "the queue is full (max_queue=1); retry later", "type": "rate_limit_error",
                              "param": None, "code": "queue_full"}
        assert httpx.get(s.url + "/health").json()["rejected"] == codes.count(429)


def test_engine_text_stream_holds_back_partial_stop_strings():
    from mtnlg.serve.engine import TextStream

    class CharTok:
        eod_id = 0

        def decode(self, ids):
            return "".join(chr(i) for i in ids if i)

    ts = TextStream(CharTok(), [ord(":")], stop=["\nUser:"])
    out = []
    for ch in " hi\nUs":
        out.append(ts.push(ord(ch))[0])
    assert "".join(out) == " hi"          # "\nUs" may begin the stop string: held back
    delta, stopped = ts.push(ord("e"))
    assert not stopped
    assert "".join(out) + delta + ts.flush() == " hi\nUse"
    ts2 = TextStream(CharTok(), [ord(":")], stop=["\nUser:"])
    text = "".join(ts2.push(ord(c))[0] for c in " ok\nUser:")
    assert text == " ok" and ts2.stopped
