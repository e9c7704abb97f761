"""``mtnlg serve``'s OpenAI surface as clients use it, through the official ``openai``
client on 127.0.0.1: models, ``n`` choices, log-probabilities (checked against a direct
forward pass of the model), ``echo`` with the prompt's log-probabilities, streamed usage,
``max_completion_tokens``, the chat template, ``/tokenize`` and ``/detokenize``, errors in
OpenAI's shape."""

from __future__ import annotations

import httpx
import pytest
import torch
from test_serve import NAME, ServerThread, local_model, model_dir  # noqa: F401  (the fixtures)

from mtnlg.generate.chat import CHAT_TEMPLATE, format_chat
from mtnlg.model.decode import generate_ids, prompt_ids_for
from mtnlg.model.sampling import SamplingConfig

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")

LOGPROB_TOL = 1e-4  # float32 forward passes: batched with a cache vs one pass over the whole text


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    with ServerThread(model_dir, max_batch_size=8, max_queue=16, batch_wait_ms=20) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _reference_logprobs(model, tok, prompt_ids: list[int], new_ids: list[int]) -> torch.Tensor:
    """(len(new_ids), vocab) log-softmax over the tokenizer's vocabulary at each new token's
    place: one forward pass over prompt + continuation, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + new_ids]))[0].float()              # (T, V_padded)
    at = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(new_ids)]           # (n, V_padded)
    return torch.log_softmax(at[:, :tok.vocab_size], dim=-1)


def test_models_list_and_retrieve(client):
    assert [(m.id, m.owned_by) for m in client.models.list().data] == [(NAME, "mtnlg")]
    m = client.models.retrieve(NAME)
    assert m.id == NAME and m.model_extra["max_model_len"] == 128
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("other")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"


def test_completion_logprobs_are_the_models_log_softmax(client, local_model):  # noqa: F811
    model, tok = local_model
    prompt = "append the key"
    ids = prompt_ids_for(tok, prompt)
    new = generate_ids(model, ids, SamplingConfig(max_new_tokens=8, min_new_tokens=8), tok.vocab_size, tok.eod_id)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=5,
                                  extra_body={"min_tokens": 8})
    choice, lp = r.choices[0], r.choices[0].logprobs
    ref = _reference_logprobs(model, tok, ids, new)                                   # (8, vocab)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(8)]
    want = ref[torch.arange(8), torch.tensor(new)]
    assert torch.allclose(torch.tensor(lp.token_logprobs), want, atol=LOGPROB_TOL), (lp.token_logprobs, want)
    for j, top in enumerate(lp.top_logprobs):
        # the 5 most likely by text (two ids with the same text keep the likelier), the chosen one always there
        assert 1 <= len(top) <= 6 and top[lp.tokens[j]] == lp.token_logprobs[j]
        best = torch.topk(ref[j], 5).values.tolist()
        assert all(min(abs(v - b) for b in best) < LOGPROB_TOL for v in top.values())
        assert abs(max(top.values()) - best[0]) < LOGPROB_TOL  # greedy: the chosen token is the most likely
    # over the vocabulary, not the padding rows of the output layer (512 rows for 400 tokens here)
    with torch.no_grad():
        padded = torch.log_softmax(model(torch.tensor([ids + new]))[0, len(ids) - 1].float(), -1)[new[0]]
    assert model.cfg.padded_vocab_size() > tok.vocab_size and abs(float(padded) - lp.token_logprobs[0]) > 0.05
    # sampled: still the model's own distribution, not the one temperature and top-p drew from
    hot = SamplingConfig(max_new_tokens=4, min_new_tokens=4, temperature=1.5, top_p=0.9, seed=11)
    drawn = generate_ids(model, ids, hot, tok.vocab_size, tok.eod_id)                # what the seed draws
    s = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=1.5, top_p=0.9, seed=11,
                                  logprobs=0, extra_body={"min_tokens": 4}).choices[0].logprobs
    ref_hot = _reference_logprobs(model, tok, ids, drawn)
    assert torch.allclose(torch.tensor(s.token_logprobs), ref_hot[torch.arange(4), torch.tensor(drawn)],
                          atol=LOGPROB_TOL)
    assert [len(t) for t in s.top_logprobs] == [1, 1, 1, 1]  # logprobs=0: the chosen token alone
    # streamed: the same tokens and values, chunk by chunk
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=5,
                                            extra_body={"min_tokens": 8}, stream=True))
    got = [(t, v, o) for c in chunks if c.choices[0].logprobs for t, v, o in
           zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs, c.choices[0].logprobs.text_offset)]
    assert got == list(zip(lp.tokens, lp.token_logprobs, lp.text_offset))


def test_chat_logprobs_content(client, local_model):  # noqa: F811
    model, tok = local_model
    messages = [{"role": "user", "content": "What does pop return"}]
    ids = prompt_ids_for(tok, format_chat(messages))
    new = generate_ids(model, ids, SamplingConfig(max_new_tokens=6, min_new_tokens=6), tok.vocab_size, tok.eod_id)
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, stop=["\u00a7"], extra_body={"min_tokens": 6})
    content = r.choices[0].logprobs.content
    ref = _reference_logprobs(model, tok, ids, new)
    cut = r.choices[0].finish_reason == "stop"  # a new turn ("\nUser:") ended the reply: its tokens are not shown
    assert r.usage.completion_tokens == 6 and (cut or len(content) == 6)
    assert "".join(c.token for c in content).strip() == r.choices[0].message.content
    for j, c in enumerate(content):
        assert abs(c.logprob - float(ref[j, new[j]])) < LOGPROB_TOL
        assert c.bytes == list(c.token.encode("utf-8"))
        assert len(c.top_logprobs) == 3
        vals = [t.logprob for t in c.top_logprobs]
        assert vals == sorted(vals, reverse=True)
        assert torch.allclose(torch.tensor(vals), torch.topk(ref[j], 3).values, atol=LOGPROB_TOL)
        assert c.top_logprobs[0].token == c.token  # greedy: the chosen token is the most likely
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=6,
                                                 temperature=0, logprobs=True, top_logprobs=3,
                                                 extra_body={"min_tokens": 6}, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs: requires logprobs to be true"):
        client.chat.completions.create(model=NAME, messages=messages, top_logprobs=2)


def _prompt_reference(model, tok, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab): the log-softmax at each prompt place j < n-1, predicting token j+1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].float()                           # (n-1, V_padded)
    return torch.log_softmax(logits[:, :tok.vocab_size], dim=-1)


def _check_prompt_logprobs(lp, ref: torch.Tensor, ids: list[int], text: str, k: int) -> int:
    """An echoed prompt's ``logprobs`` against the reference: the tokens join into ``text``
    at their offsets, the first has no value, each other's value and ``k`` alternatives are
    the reference's. Returns at how many places the prompt's token is among the top ``k``."""
    n = len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(n)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    want = ref[torch.arange(n - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-5), (lp.token_logprobs, want)
    in_top = 0
    for j in range(1, n):
        top, actual = lp.top_logprobs[j], lp.tokens[j]
        best, best_ids = torch.topk(ref[j - 1], k)
        assert top[actual] == lp.token_logprobs[j]  # the prompt's token always among them
        if k == 0:
            assert top == {actual: lp.token_logprobs[j]}
            continue
        assert abs(max(top.values()) - float(best[0])) < 1e-5
        if ids[j] in best_ids.tolist():
            in_top += 1
            assert len(top) <= k and all(min(abs(v - b) for b in best.tolist()) < 1e-5 for v in top.values())
        else:
            assert len(top) <= k + 1 and top[actual] < float(best[-1]) + 1e-5
    return in_top


def test_echo_with_max_tokens_0_scores_the_prompt(client, local_model):  # noqa: F811
    model, tok = local_model
    prompt = "sort the list and pop the key"
    ids = prompt_ids_for(tok, prompt)
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
    echo = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == prompt + plain.choices[0].text and echo.choices[0].logprobs is None
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    assert r.choices[0].text == prompt and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    assert r.choices[0].logprobs.tokens[0] == ""  # the end-of-document token that starts every prompt
    _check_prompt_logprobs(r.choices[0].logprobs, _prompt_reference(model, tok, ids), ids, prompt, 2)
    # a token prompt ending in the model's greedy continuation: those 6 tokens are the likeliest at their places
    gen = generate_ids(model, ids, SamplingConfig(max_new_tokens=6, min_new_tokens=6), tok.vocab_size, tok.eod_id)
    greedy = client.completions.create(model=NAME, prompt=ids + gen, max_tokens=0, echo=True, logprobs=2).choices[0]
    assert greedy.text == tok.decode(ids + gen)
    ref = _prompt_reference(model, tok, ids + gen)
    assert _check_prompt_logprobs(greedy.logprobs, ref, ids + gen, greedy.text, 2) >= 6
    # a character split over byte tokens: "" for its first bytes, the character with its last
    snow = "pop the \u2603 key"
    snow_ids = prompt_ids_for(tok, snow)
    assert len(snow_ids) > len(snow.split()) + 3  # the tokenizer has no piece for it: three byte tokens
    sl = client.completions.create(model=NAME, prompt=snow, max_tokens=0, echo=True, logprobs=1).choices[0].logprobs
    _check_prompt_logprobs(sl, _prompt_reference(model, tok, snow_ids), snow_ids, snow, 1)
    at = sl.tokens.index("\u2603")
    assert sl.tokens[at - 2:at] == ["", ""] and len(set(sl.text_offset[at - 2:at + 1])) == 1
    # n choices of several token prompts; logprobs=0; a whole window can be scored, not one token more
    window = (tok.encode(" ".join([prompt] * 40)) * 2)[:128]
    r2 = client.completions.create(model=NAME, prompt=[ids[1:], window], max_tokens=0, echo=True, logprobs=0, n=2)
    assert [c.text for c in r2.choices] == [prompt, prompt, tok.decode(window), tok.decode(window)]
    short, full = r2.choices[0].logprobs, r2.choices[2].logprobs
    assert r2.choices[1].logprobs == short and r2.choices[3].logprobs == full
    assert short.tokens == r.choices[0].logprobs.tokens[1:]
    one = client.completions.create(model=NAME, prompt=ids[1:2], max_tokens=0, echo=True, logprobs=3).choices[0]
    assert (one.text, one.logprobs.tokens, one.logprobs.token_logprobs) == (tok.decode(ids[1:2]), [one.text], [None])
    _check_prompt_logprobs(short, _prompt_reference(model, tok, ids[1:]), ids[1:], prompt, 0)
    assert all(len(t) == 1 for t in short.top_logprobs[1:])  # logprobs=0: the prompt's token alone
    _check_prompt_logprobs(full, _prompt_reference(model, tok, window), window, tok.decode(window), 0)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens") as e:
        client.completions.create(model=NAME, prompt=window + [5], max_tokens=0, echo=True, logprobs=0)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0 is only allowed with echo") as e:
        client.completions.create(model=NAME, prompt=prompt, max_tokens=0, logprobs=2)
    assert e.value.body["param"] == "max_tokens"


def test_echo_with_a_completion_joins_their_logprobs(client, local_model):  # noqa: F811
    model, tok = local_model
    prompt = "sort the list and pop the key"
    ids = prompt_ids_for(tok, prompt)
    n = len(ids)
    kw = dict(model=NAME, prompt=prompt, temperature=0, logprobs=2)
    scored = client.completions.create(max_tokens=0, echo=True, **kw).choices[0].logprobs
    alone = client.completions.create(max_tokens=6, extra_body={"min_tokens": 6}, **kw).choices[0]
    both = client.completions.create(max_tokens=6, extra_body={"min_tokens": 6}, echo=True, **kw).choices[0]
    got = both.logprobs
    assert both.text == prompt + alone.text and "".join(got.tokens) == both.text
    assert got.tokens == scored.tokens + alone.logprobs.tokens
    assert got.text_offset == scored.text_offset + [len(prompt) + o for o in alone.logprobs.text_offset]
    assert got.token_logprobs[:n] == scored.token_logprobs and got.top_logprobs[:n] == scored.top_logprobs
    assert got.top_logprobs[n:] == alone.logprobs.top_logprobs
    assert got.token_logprobs[n:] == alone.logprobs.token_logprobs
    # all of them: one forward pass over prompt + completion
    gen = generate_ids(model, ids, SamplingConfig(max_new_tokens=6, min_new_tokens=6), tok.vocab_size, tok.eod_id)
    whole = _prompt_reference(model, tok, ids + gen)
    assert torch.allclose(torch.tensor(got.token_logprobs[1:]), whole[torch.arange(n + 5), torch.tensor(ids[1:] + gen)],
                          atol=LOGPROB_TOL)
    # streamed: each choice's first chunk is the prompt with its entries, then the completion's as without echo
    chunks = list(client.completions.create(max_tokens=6, extra_body={"min_tokens": 6}, echo=True, stream=True,
                                            n=2, **kw))
    firsts = [c.choices[0] for c in chunks[:2]]
    assert [f.index for f in firsts] == [0, 1] and all(f.text == prompt and f.logprobs == scored for f in firsts)
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == both.text
        entries = [c.logprobs for c in mine if c.logprobs]
        assert [t for e in entries for t in e.tokens] == got.tokens
        assert [o for e in entries for o in e.text_offset] == got.text_offset
        values = [v for e in entries for v in e.token_logprobs]
        assert values[:n] == scored.token_logprobs  # two choices decoded together: the completion's to rounding
        assert torch.allclose(torch.tensor(values[n:]), torch.tensor(got.token_logprobs[n:]), atol=LOGPROB_TOL)
    # a prompt whose text is empty still has its entry in the first chunk
    eod = list(client.completions.create(model=NAME, prompt=[tok.eod_id], max_tokens=0, echo=True, logprobs=1,
                                         stream=True))
    assert [(c.choices[0].text, c.choices[0].finish_reason) for c in eod] == [("", None), ("", "length")]
    assert eod[0].choices[0].logprobs.tokens == [""] and eod[0].choices[0].logprobs.token_logprobs == [None]


def test_n_choices_each_with_its_own_seed(client):
    kw = dict(model=NAME, prompt="sort the list", max_tokens=10, temperature=1.0, top_p=0.95)
    r = client.completions.create(n=3, seed=5, **kw)
    singles = [client.completions.create(seed=5 + i, **kw) for i in range(3)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in r.choices}) > 1  # different draws, not one answer three times
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    chunks = list(client.completions.create(n=3, seed=5, stream=True, stream_options={"include_usage": True}, **kw))
    texts = ["", "", ""]
    for ch in chunks[:-1]:
        texts[ch.choices[0].index] += ch.choices[0].text
    assert texts == [c.text for c in r.choices] and chunks[-1].usage == r.usage
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason) == 3
    # two prompts x n=2: choice i*n + j answers prompt i
    two = client.completions.create(model=NAME, prompt=["sort the list", "pop the key"], n=2, seed=5, max_tokens=6,
                                    temperature=1.0)
    alone = client.completions.create(model=NAME, prompt="pop the key", n=2, seed=5, max_tokens=6, temperature=1.0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices[2:]] == [c.text for c in alone.choices]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2, seed=9,
                                          max_tokens=8, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert [c.message.content for c in chat.choices] == [
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], seed=9 + i,
                                       max_tokens=8, temperature=1.0).choices[0].message.content for i in range(2)]


def test_streamed_usage_comes_last_with_no_choices(client):
    kw = dict(model=NAME, prompt="import the module", max_tokens=7, temperature=0, extra_body={"min_tokens": 7})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens == 7 and whole.usage.total_tokens == whole.usage.prompt_tokens + 7
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    plain = list(client.completions.create(stream=True, **kw))  # without include_usage: no usage anywhere
    assert all(c.usage is None and c.choices for c in plain)


def test_max_completion_tokens_and_stop_as_string(client):
    messages = [{"role": "user", "content": "sort the list"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=5, temperature=0,
                                       extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason in ("length", "stop")
    full = client.completions.create(model=NAME, prompt="sort the list", max_tokens=20, temperature=0,
                                     extra_body={"min_tokens": 20}).choices[0].text
    stop = full[6:9]
    cut = client.completions.create(model=NAME, prompt="sort the list", max_tokens=20, temperature=0,
                                    extra_body={"min_tokens": 20}, stop=stop)
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_template_is_the_chat_format(server, local_model):  # noqa: F811
    """The Jinja template a Hugging Face export can carry gives, through transformers, the
    token ids the server runs for a chat request (/tokenize, usage.prompt_tokens)."""
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast
    from transformers.utils.chat_template_utils import render_jinja_template

    from mtnlg.fuse.hf_tokenizer import build_hf_tokenizer

    _, tok = local_model
    conv = [{"role": "system", "content": "  Be  brief.\n"}, {"role": "user", "content": "What is\ta dict?"},
            {"role": "assistant", "content": "A mapping."}, {"role": "user", "content": "And a list?"}]
    assert format_chat(conv) == "System: Be brief.\nUser: What is a dict?\nAssistant: A mapping.\nUser: And a list?\n" \
                                "Assistant:"
    for gen in (True, False):
        rendered = render_jinja_template([conv], chat_template=CHAT_TEMPLATE, add_generation_prompt=gen)[0][0]
        assert rendered == format_chat(conv, add_generation_prompt=gen)
    hf = PreTrainedTokenizerFast(tokenizer_object=build_hf_tokenizer(tok), eos_token=tok.id_to_piece(tok.eod_id))
    hf.chat_template = CHAT_TEMPLATE
    assert hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == "</s>" + format_chat(conv)
    ids = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids == prompt_ids_for(tok, format_chat(conv))
    t = httpx.post(server.url + "/tokenize", json={"model": NAME, "messages": conv}).json()
    assert t["tokens"] == ids and t["count"] == len(ids)
    c = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": NAME, "messages": conv, "max_tokens": 2, "temperature": 0}).json()
    assert c["usage"]["prompt_tokens"] == len(ids)
    # content as a list of text parts, and "developer" as OpenAI's newer name for "system"
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, conv[1]]
    t2 = httpx.post(server.url + "/tokenize", json={"messages": parts}).json()
    assert t2["tokens"] == prompt_ids_for(tok, format_chat([{"role": "system", "content": "Be brief."}, conv[1]]))


def test_tokenize_and_detokenize(server, client, local_model):  # noqa: F811
    _, tok = local_model
    prompt = "pop the value"
    t = httpx.post(server.url + "/tokenize", json={"model": NAME, "prompt": prompt})
    assert t.status_code == 200
    ids = prompt_ids_for(tok, prompt)
    assert t.json() == {"tokens": ids, "count": len(ids), "max_model_len": 128}
    bare = httpx.post(server.url + "/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert bare["tokens"] == tok.encode(prompt) and bare["count"] == len(ids) - 1
    d = httpx.post(server.url + "/detokenize", json={"model": NAME, "tokens": ids})
    assert d.status_code == 200 and d.json() == {"prompt": prompt}
    # the tokens are the prompt the server runs: as a token prompt they give the same completion
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage == by_text.usage
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, 999999]})
    assert bad.status_code == 400 and bad.json() == {"error": {
        "message": f"tokens: token id 999999 is outside the vocabulary (size {tok.vocab_size})",
        "type": "invalid_request_error", "param": "tokens", "code": None}}
    both = httpx.post(server.url + "/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "a"}]})
    assert both.status_code == 400 and both.json()["error"]["message"] == "give either prompt or messages"
    other = httpx.post(server.url + "/tokenize", json={"model": "other", "prompt": "a"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"


def test_errors_have_openais_shape(server, client, local_model, monkeypatch):  # noqa: F811
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="x")
    assert e.value.status_code == 404 and e.value.body == {
        "message": "The model 'other' does not exist: this server serves 'tiny-gpt'", "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    r = httpx.post(server.url + "/v1/embeddings", json={"model": NAME, "input": "x"})
    assert r.status_code == 404 and r.json() == {"error": {"message": "Invalid URL (POST /v1/embeddings)",
                                                           "type": "invalid_request_error", "param": None,
                                                           "code": None}}
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    n = len(prompt_ids_for(local_model[1], "list"))
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "list", "max_tokens": 128})
    assert r.status_code == 400 and r.json() == {"error": {
        "message": f"This model's maximum context length is 128 tokens. However, you requested {n + 128} tokens "
                   f"({n} in the prompt, 128 for the completion).",
        "type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded"}}
    # a fault inside a route: 500, still in OpenAI's shape

    def broken(requests):
        raise RuntimeError("no room")

    monkeypatch.setattr(server.app.state.engine, "submit_many", broken)
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "list", "max_tokens": 2})
    assert r.status_code == 500 and r.json() == {"error": {"message": "internal error: RuntimeError: no room",
                                                           "type": "server_error", "param": None,
                                                           "code": "internal_error"}}
