"""Our SentencePiece tokenizer as Hugging Face ``tokenizers`` files (``tokenizer.json``).

transformers' own converter needs ``sentencepiece_model_pb2``, which requires a newer
protobuf runtime than kfp and Beam allow, so the conversion is done here from the
SentencePiece processor itself: the vocabulary by id, BPE merges rebuilt from it (or the
unigram scores), the same whitespace handling (``▁``, dummy prefix), byte fallback and
special tokens. The result is checked against SentencePiece on probe texts before it is
written; a model it cannot reproduce exactly (e.g. an NFKC normaliser) is reported, not
exported wrongly.
"""

from __future__ import annotations

import os
from typing import Any

from mtnlg.formats.tokenizer import CHAT_TEMPLATE, Tokenizer

SPACE = "\u2581"  # SentencePiece's visible space, "▁"

#: Texts both tokenizers must encode to the same ids (prose, code, newlines, non-ASCII).
PROBES = (
    "The Python Tutorial: an informal introduction to Python.",
    "  Leading spaces,\ttabs and\nnew lines\n\n  are kept.",
    "def main():\n    return [x ** 2 for x in range(10)]  # squares",
    "Unicode: café, naïve, Ångström, 東京, emoji 🙂, math ∑ x² ≤ ∞.",
    "URLs like https://docs.python.org/3/library/os.html?x=1&y=2 and e-mail a.b@c.org",
)


def build_hf_tokenizer(tok: Tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes exactly as ``tok`` (raises ValueError if it can't)."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    if tok.normalization not in ("identity", ""):
        raise ValueError(f"normalization {tok.normalization!r} has no exact tokenizers equivalent here "
                         "(train the tokenizer with normalization=identity)")
    if tok.remove_extra_whitespaces:
        raise ValueError("remove_extra_whitespaces=true has no exact tokenizers equivalent")
    sp = tok.sp
    n = sp.get_piece_size()
    unk = sp.id_to_piece(sp.unk_id())
    if tok.model_type == "bpe":
        from transformers.convert_slow_tokenizer import generate_merges

        vocab = {sp.id_to_piece(i): i for i in range(n)}
        model = models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=unk, fuse_unk=True,
                           byte_fallback=tok.byte_fallback)
    elif tok.model_type == "unigram":
        model = models.Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)], unk_id=sp.unk_id(),
                               byte_fallback=tok.byte_fallback)
    else:
        raise ValueError(f"model type {tok.model_type!r} is not supported")
    hf = HFTokenizer(model)
    steps = [normalizers.Prepend(SPACE)] if tok.add_dummy_prefix else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if tok.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    hf.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                           for i in range(n) if sp.is_control(i)])
    for text in PROBES:
        ours, theirs = tok.encode(text), hf.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            raise ValueError(f"converted tokenizer disagrees with SentencePiece on {text!r}")
    return hf


def write_hf_tokenizer(tok: Tokenizer, out_dir: str) -> dict[str, Any]:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ special tokens) into ``out_dir``,
    loadable with ``AutoTokenizer.from_pretrained(out_dir)``."""
    from transformers import PreTrainedTokenizerFast

    sp = tok.sp
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_hf_tokenizer(tok),
        unk_token=sp.id_to_piece(tok.unk_id),
        bos_token=sp.id_to_piece(tok.bos_id) if tok.bos_id >= 0 else None,
        eos_token=sp.id_to_piece(tok.eod_id),
        pad_token=sp.id_to_piece(tok.pad_id) if tok.pad_id >= 0 else None,
    )
    fast.chat_template = CHAT_TEMPLATE  # the chat format of `mtnlg generate --chat` and `mtnlg serve`
    files = fast.save_pretrained(out_dir)
    return {"files": sorted(os.path.basename(f) for f in files), "vocab_size": sp.get_piece_size()}
