"""Generation: sampling filters, KV-cache decoding against recomputation, stop at
end-of-document, chat formatting, and the ``mtnlg generate`` command."""

from __future__ import annotations

import io

import pytest
import torch

from mtnlg.config import ConfigError
from mtnlg.generate.chat import _cut_at_turn, chat, chat_reply, format_chat
from mtnlg.model.config import ModelConfig
from mtnlg.model.decode import BatchDecoder, generate, generate_ids, stream_tokens
from mtnlg.model.gpt import GPT, KVCache
from mtnlg.model.sampling import SamplingConfig, adjust_logits, sample_next_token, top_k_filter, top_p_filter

pytestmark = pytest.mark.unit

TEXT = ("The list type supports append and pop. A dictionary maps keys to values. "
        "Functions are defined with def and return values with return. ") * 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import sentencepiece as spm

    from mtnlg.formats.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split(". ")), model_prefix=str(d / "sp"),
                                   vocab_size=120, model_type="bpe", eos_id=1, bos_id=-1, pad_id=-1,
                                   unk_id=0, minloglevel=2)
    return Tokenizer(str(d / "sp.model"))


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_length=48, vocab_size=120, **kw)
    return GPT(cfg).eval()


VARIANTS = {
    "gpt2": {},
    "llama-gqa": dict(position="rotary", norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                      tie_embeddings=False, bias=False),
    "sinusoidal": dict(position="sinusoidal"),
}


# ------------------------------------------------------------------ sampling


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    # the most likely token survives any p
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))
    draws = [sample_next_token(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    allowed = torch.topk(logits, 10).indices
    for _ in range(20):
        tok = sample_next_token(logits, 2.0, 10, 1.0, torch.Generator())
        assert all(int(tok[r]) in allowed[r].tolist() for r in range(3))


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0)


# ------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_logits_equal_full_recomputation(variant):
    model = tiny_model(**VARIANTS[variant])
    tokens = torch.randint(0, 120, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)                                                      # (2, 40, V)
        cache = KVCache.for_model(model, batch_size=2)
        parts = [model(tokens[:, :17], cache=cache)]                              # prefill
        for t in range(17, 30):
            parts.append(model(tokens[:, t:t + 1], cache=cache))                  # one token at a time
        parts.append(model(tokens[:, 30:], cache=cache))                          # a chunk after a prefix
    inc = torch.cat(parts, dim=1)
    assert cache.length == 40
    assert torch.allclose(inc, full, atol=1e-5, rtol=1e-5), float((inc - full).abs().max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_with_cache_equals_without(variant):
    model = tiny_model(**VARIANTS[variant])
    prompt = [1, 5, 9, 33, 7]
    s = SamplingConfig(max_new_tokens=30, stop_at_eod=False)
    cached = generate_ids(model, prompt, s, use_cache=True)
    plain = generate_ids(model, prompt, s, use_cache=False)
    assert len(cached) == 30 and cached == plain


def test_sampled_generation_is_reproducible_and_cache_independent():
    model = tiny_model()
    s = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=5, stop_at_eod=False)
    a = generate_ids(model, [1, 2, 3], s)
    assert a == generate_ids(model, [1, 2, 3], s)
    assert a == generate_ids(model, [1, 2, 3], s, use_cache=False)


def test_generation_past_the_window_keeps_going():
    model = tiny_model()
    out = generate_ids(model, list(range(3, 40)), SamplingConfig(max_new_tokens=40, stop_at_eod=False))
    assert len(out) == 40  # 37 + 40 > seq_length 48: the window slides


def test_padding_ids_are_never_generated():
    model = tiny_model()  # vocab 120, padded to 128
    with torch.no_grad():
        model.output.weight[120:] = 10.0  # make the padding rows win the argmax
    out = generate_ids(model, [1, 2], SamplingConfig(max_new_tokens=10, stop_at_eod=False), vocab_size=120)
    assert all(t < 120 for t in out)


class _CountdownModel(torch.nn.Module):
    """Predicts token 7 until the sequence is 5 long, then the end-of-document token 1."""

    def __init__(self):
        super().__init__()
        self.cfg = ModelConfig(num_layers=1, hidden_size=8, num_heads=2, seq_length=32, vocab_size=16)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, cache=None):
        B, T = tokens.shape
        logits = torch.zeros(B, T, 128)
        logits[:, -1, 7 if T < 5 else 1] = 1.0
        return logits


def test_stops_at_end_of_document():
    m = _CountdownModel()
    out = generate_ids(m, [3, 3], SamplingConfig(max_new_tokens=10), eod_id=1, use_cache=False)
    assert out == [7, 7, 7]
    out = generate_ids(m, [3, 3], SamplingConfig(max_new_tokens=6, stop_at_eod=False), eod_id=1, use_cache=False)
    assert out[:3] == [7, 7, 7] and out[3] == 1


def test_min_new_tokens_and_repetition_penalty():
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5])
    s = SamplingConfig(max_new_tokens=8, min_new_tokens=2, repetition_penalty=2.0)
    out = adjust_logits(logits, [0, 1], generated=1, sampling=s, eod_id=2)
    # seen tokens: positive halved, negative doubled; eod (2) forbidden before 2 new tokens
    assert out.tolist() == [1.0, -2.0, float("-inf"), 0.5]
    assert adjust_logits(logits, [0, 1], generated=2, sampling=s, eod_id=2)[2] == 3.0
    assert logits.tolist() == [2.0, -1.0, 3.0, 0.5]  # the input is left alone
    with pytest.raises(ConfigError, match="min_new_tokens=9 exceeds max_new_tokens=8"):
        SamplingConfig(max_new_tokens=8, min_new_tokens=9)
    # in generation: a model that always prefers end-of-document still writes min_new_tokens
    model = EodFirst(tiny_model().cfg)
    assert generate_ids(model, [3, 4, 5], SamplingConfig(max_new_tokens=10), eod_id=1) == []
    ids = generate_ids(model, [3, 4, 5], SamplingConfig(max_new_tokens=10, min_new_tokens=6), eod_id=1)
    assert len(ids) == 6 and 1 not in ids


class EodFirst(torch.nn.Module):
    """Logits that rank end-of-document (1) first and token 7 second, at every position."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, x, cache=None):
        if cache is not None:
            cache.length += x.shape[1]
        logits = torch.zeros(*x.shape, self.cfg.vocab_size)
        logits[..., 1], logits[..., 7] = 10.0, 5.0
        return logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batch_decoder_rows_equal_single_sequence_decoding(variant):
    """Prompts of different lengths in one left-padded batch give each row the tokens it
    gets alone: greedy ids equal, and seeded sampling draws the same tokens."""
    model = tiny_model(**VARIANTS[variant])
    prompts = [[5, 9, 11, 3, 7, 2, 8], [4], [10, 20, 30, 40]]
    samplings = [SamplingConfig(max_new_tokens=12, stop_at_eod=False),
                 SamplingConfig(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=3, stop_at_eod=False),
                 SamplingConfig(max_new_tokens=5, repetition_penalty=1.3, stop_at_eod=False)]
    dec = BatchDecoder(model, prompts, samplings, vocab_size=120, eod_id=1)
    rows: list[list[int]] = [[] for _ in prompts]
    steps = 0
    while not dec.done:
        for r, t in enumerate(dec.step()):
            if t is not None:
                rows[r].append(t)
        steps += 1
    assert steps == 20
    for p, s, got in zip(prompts, samplings, rows):
        assert got == generate_ids(model, p, s, vocab_size=120, eod_id=1)
    assert dec.finish_reason == ["length"] * 3


def test_batch_decoder_finish_reason_is_stop_at_the_end_of_document_and_length_at_the_limit():
    """A model that always ranks end-of-document first: each row ends its document as soon
    as min_new_tokens lets it ("stop"), unless max_new_tokens comes first ("length")."""
    model = EodFirst(tiny_model().cfg)
    samplings = [SamplingConfig(max_new_tokens=10, min_new_tokens=3),       # the document ends after 3
                 SamplingConfig(max_new_tokens=4, min_new_tokens=4),        # the limit comes first
                 SamplingConfig(max_new_tokens=10),                         # the document ends at once
                 SamplingConfig(max_new_tokens=2, stop_at_eod=False)]       # end-of-document is a token
    dec = BatchDecoder(model, [[3, 4, 5], [6], [2, 2], [9]], samplings, vocab_size=120, eod_id=1)
    rows: list[list[int]] = [[] for _ in samplings]
    while not dec.done:
        for r, t in enumerate(dec.step()):
            if t is not None:
                rows[r].append(t)
    assert rows == [[7, 7, 7], [7, 7, 7, 7], [], [1, 1]]
    assert dec.finish_reason == ["stop", "length", "stop", "length"]


def test_batch_decoder_logits_match_and_padding_is_not_read():
    model = tiny_model(position="rotary", norm="rmsnorm", tie_embeddings=False)
    a, b = [5, 9, 11, 3, 7], [4, 6]
    cache = KVCache.for_model(model, batch_size=2, pad=torch.tensor([0, 3]))
    with torch.no_grad():
        batch = model(torch.tensor([a, [99, 98, 97] + b]), cache=cache)        # padding ids are arbitrary
        alone = model(torch.tensor([b]))
    assert torch.allclose(batch[1, 3:], alone[0], atol=1e-5)
    assert torch.allclose(batch[0], model(torch.tensor([a]))[0], atol=1e-5)


def test_batch_decoder_stops_rows_and_rejects_what_does_not_fit():
    model = tiny_model()
    dec = BatchDecoder(model, [[3, 4], [5]], [SamplingConfig(max_new_tokens=10)] * 2, vocab_size=120, eod_id=1)
    dec.step()
    dec.finish(0)
    assert dec.step()[0] is None and dec.finish_reason[0] == "stop"
    with pytest.raises(ValueError, match="prompt 0: 40 tokens \\+ max_new_tokens=10 exceed the model's window of 48"):
        BatchDecoder(model, [[3] * 40], [SamplingConfig(max_new_tokens=10)], vocab_size=120)
    with pytest.raises(ValueError, match="cannot share a batch"):
        BatchDecoder(model, [[3] * 40, [4]], [SamplingConfig(max_new_tokens=8), SamplingConfig(max_new_tokens=40)],
                     vocab_size=120)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        BatchDecoder(model, [[3], []], [SamplingConfig(max_new_tokens=4)] * 2, vocab_size=120)


def test_generate_text_streams_what_it_returns(tokenizer):
    model = tiny_model()
    pieces = []
    text = generate(model, tokenizer, "The list", max_new_tokens=12, stop_at_eod=False, on_token=pieces.append)
    assert isinstance(text, str) and "".join(pieces) == text
    with pytest.raises(ValueError, match="no tokens"):
        list(stream_tokens(model, [], SamplingConfig(), 120))


# ------------------------------------------------------------------ chat


def test_chat_format_and_turn_cut():
    text = format_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}])
    assert text == "System: Be brief.\nUser: Hi there\nAssistant:"
    assert _cut_at_turn(" Hello.\nUser: more") == (" Hello.", True)
    assert _cut_at_turn(" Hello") == (" Hello", False)
    with pytest.raises(ValueError, match="unknown role"):
        format_chat([{"role": "bot", "content": "x"}])


def test_chat_reply_and_interactive_loop(tokenizer):
    model = tiny_model()
    reply = chat_reply(model, tokenizer, [{"role": "user", "content": "What is a list?"}], max_new_tokens=8, seed=1)
    assert isinstance(reply, str) and "\nUser:" not in reply
    lines = iter(["hello", "/reset", "again", "/exit"])
    out = io.StringIO()
    msgs = chat(model, tokenizer, input_fn=lambda _: next(lines), out=out, max_new_tokens=4, seed=0)
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[0]["content"] == "again"
    assert "(conversation reset)" in out.getvalue()


# ------------------------------------------------------------------ command line


def test_generate_cli(tokenizer, tmp_path, capsys):
    from mtnlg.cli import main
    from mtnlg.formats.fused import save_fused

    save_fused(tiny_model(), str(tmp_path / "m"), tokenizer)
    assert main(["generate", str(tmp_path / "m"), "--prompt", "A dictionary", "--max-new-tokens", "6"]) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("A dictionary")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "A dictionary", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == greedy  # greedy is deterministic
    assert main(["generate", str(tmp_path / "m"), "--prompt", "x", "--top-p", "0"]) == 2  # ConfigError
