"""OpenAI's response shapes: choices, their log-probabilities, usage, stream chunks.

    choice = completion_choice(0, "text", "stop", completion_logprobs(tokens, 0))
    body = envelope("cmpl-1", "text_completion", created, "gpt", [choice], usage(12, 5))
    sse(body)                                        # 'data: {...}\\n\\n'
"""

from __future__ import annotations

import json
from typing import Any

from mtnlg.serve.engine import TokenLogprob

DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict], usage: dict | None = None,
             with_usage: bool = False) -> dict:
    """A response or stream chunk. ``with_usage``: carry ``usage`` even when it is None (the
    chunks of a stream that ends with a usage chunk say ``"usage": null``)."""
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None or with_usage:
        out["usage"] = usage
    return out


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index: int, message: dict, finish: str | None, logprobs: dict | None = None,
                key: str = "message") -> dict:
    """``key``: "message" in a response, "delta" in a stream chunk."""
    return {"index": index, key: message, "logprobs": logprobs, "finish_reason": finish}


def completion_logprobs(tokens: list[TokenLogprob], base_offset: int) -> dict:
    """The completions API's ``logprobs``: each token's text, log-probability, its most
    likely alternatives by text (the chosen token always among them, so up to k + 1) and
    where its text begins (``base_offset``: where the completion begins in ``text``)."""
    top = []
    for t in tokens:
        alts: dict[str, float] = {}
        for _, text, lp in t.top:
            alts.setdefault(text, lp)
        alts.setdefault(t.text, t.logprob)
        top.append(alts)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": top, "text_offset": [base_offset + t.offset for t in tokens]}


def prompt_logprobs(first: str, tokens: list[TokenLogprob]) -> dict:
    """``logprobs`` of an echoed prompt: its first token (``first``, its text) has no
    log-probability and no alternatives (null), then each later token as generated ones."""
    rest = completion_logprobs(tokens, 0)
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def joined_logprobs(head: dict, tail: dict) -> dict:
    """Two completions ``logprobs`` one after the other (the echoed prompt's, the completion's)."""
    return {key: head[key] + tail[key] for key in head}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """The chat API's ``logprobs``: ``content``, one entry per token with its UTF-8 bytes and
    exactly ``top_logprobs`` alternatives."""
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for _, s, lp in t.top]}
                        for t in tokens],
            "refusal": None}
