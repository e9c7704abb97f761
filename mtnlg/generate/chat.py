"""Chat on top of a plain language model: a role-tagged transcript the model continues.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``
(the shape most chat tools use), written out as one document::

    System: You answer questions about Python.
    User: What does len() return?
    Assistant:

and the model continues after ``Assistant:`` until it starts a new turn (a line beginning
with ``User:`` or ``System:``), ends the document, or reaches ``max_new_tokens``.
:data:`CHAT_TEMPLATE` is the same format as a Hugging Face chat template (Jinja), for a
``tokenizer_config.json`` to carry: ``apply_chat_template`` renders the end-of-document
token and what :func:`format_chat` writes. A base
model trained on ordinary text has never seen this format, so the replies are only as
good as its continuation of the transcript; the same code serves a model fine-tuned on
such transcripts.

    reply = chat_reply(model, tok, [{"role": "user", "content": "What is a list?"}])
    chat(model, tok)   # interactive loop in the terminal; /reset, /exit
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from mtnlg.formats.tokenizer import CHAT_TEMPLATE  # noqa: F401  (the format as a Hugging Face chat template)
from mtnlg.model.decode import prompt_ids_for, stream_tokens
from mtnlg.model.sampling import SamplingConfig

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
# where a reply ends: the start of any next turn
TURN_STARTS = tuple(f"\n{tag}:" for tag in ROLES.values())



def format_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The transcript for ``messages``, ending with ``Assistant:`` for the reply
    (``add_generation_prompt=False``: with the last message)."""
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {sorted(ROLES)}")
        content = " ".join(str(m["content"]).split())  # one line per turn
        lines.append(f"{ROLES[role]}: {content}")
    if add_generation_prompt:
        lines.append(f"{ROLES['assistant']}:")
    return "\n".join(lines)


def _cut_at_turn(text: str) -> tuple[str, bool]:
    """``text`` up to the first new-turn marker, and whether one was found."""
    cut = min((i for i in (text.find(t) for t in TURN_STARTS) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def chat_reply(model: torch.nn.Module, tokenizer, messages: list[dict], max_new_tokens: int = 128,
               temperature: float = 0.7, top_k: int = 0, top_p: float = 0.9, seed: int | None = None,
               on_text: Callable[[str], None] | None = None) -> str:
    """The assistant's next message for ``messages`` (stripped of surrounding spaces)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed)
    ids: list[int] = []
    shown = ""
    text = ""
    for tok in stream_tokens(model, prompt_ids_for(tokenizer, format_chat(messages)), sampling,
                             tokenizer.vocab_size, tokenizer.eod_id):
        ids.append(tok)
        text, done = _cut_at_turn(tokenizer.decode(ids))
        if on_text is not None:
            # hold back a possible partial marker ("\nUs") until it is decided
            safe = text if done else text[: max(len(shown), len(text) - max(map(len, TURN_STARTS)))]
            if len(safe) > len(shown) and safe.startswith(shown):
                on_text(safe[len(shown):])
                shown = safe
        if done:
            break
    if on_text is not None and len(text) > len(shown) and text.startswith(shown):
        on_text(text[len(shown):])
    return text.strip()


def chat(model: torch.nn.Module, tokenizer, system: str | None = None, input_fn: Callable[[str], str] = input,
         out=None, **sampling) -> list[dict]:
    """An interactive conversation in the terminal; returns the transcript as messages.

    Commands: ``/reset`` forgets the conversation, ``/exit`` (or end of input) leaves.
    Keyword arguments go to :func:`chat_reply` (temperature, top_p, max_new_tokens, seed).
    """
    out = out or sys.stdout
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print("mtnlg chat: type a message; /reset starts over, /exit leaves.", file=out)
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            messages = messages[:1] if system else []
            print("(conversation reset)", file=out)
            continue
        messages.append({"role": "user", "content": line})
        print("model> ", end="", file=out, flush=True)
        reply = chat_reply(model, tokenizer, messages,
                           on_text=lambda s: print(s, end="", file=out, flush=True), **sampling)
        print(file=out, flush=True)
        messages.append({"role": "assistant", "content": reply})
    return messages
