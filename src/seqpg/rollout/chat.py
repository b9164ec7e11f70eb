"""New messages as a token delta: the kept tokens are never decoded and re-tokenised.

The context of an episode is a list of token ids, appended to and never rebuilt.  When an
observation arrives (a tool result, a user's reply), the chat template renders the whole
conversation with the new messages and the assistant generation prompt, and only the text past
what the kept ids already hold is tokenised and appended:

    full  = template(messages + new, add_generation_prompt=True)
    kept  = decode(kept_ids)                   # the prompt, every model turn, every delta so far
    delta = tokenize(full[len(kept):])         # requires full.startswith(kept)

The model's own turn is in ``messages`` as its decoded text (special tokens kept, a final EOS
left to the template, which closes the turn itself), so for templates that render history as it
is (ChatML and most others) the kept text is a prefix of the new render.  A template that
rewrites earlier turns (strips whitespace, drops reasoning) breaks this, and :func:`render_delta`
raises naming where the texts part instead of silently re-tokenising the model's tokens.
"""

from __future__ import annotations

from .environments import Message


def render_start(tokenizer, messages: list[Message], template_kwargs: dict, *, chat_template: bool = True) -> list[int]:
    """Token ids of an episode's first input: the template with the generation prompt (or the raw text)."""
    if not chat_template:
        return list(tokenizer("".join(m["content"] for m in messages)).input_ids)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def render_delta(tokenizer, messages: list[Message], new: list[Message], kept_ids: list[int], template_kwargs: dict,
                 *, chat_template: bool = True) -> list[int]:
    """Token ids to append to ``kept_ids`` so the context holds ``messages + new`` and a generation prompt.

    ``messages`` is the conversation the kept ids hold (its last entry the model's turn).  Without a
    chat template the new messages' contents are appended as they are.
    """
    if not chat_template:
        return list(tokenizer("".join(m["content"] for m in new), add_special_tokens=False).input_ids)
    full = tokenizer.apply_chat_template(messages + new, add_generation_prompt=True, tokenize=False,
                                         **template_kwargs)
    kept = decode_kept(tokenizer, kept_ids)
    if not full.startswith(kept):
        at = next((i for i, (a, b) in enumerate(zip(full, kept)) if a != b), min(len(full), len(kept)))
        raise ValueError(f"chat template: rendering the conversation changes text already in the context at "
                         f"character {at} (kept {kept[at:at + 40]!r}, template {full[at:at + 40]!r}); this template "
                         "rewrites earlier turns, so observations cannot be appended as a delta; use a template "
                         "that renders history verbatim")
    return list(tokenizer(full[len(kept):], add_special_tokens=False).input_ids)


def decode_kept(tokenizer, ids: list[int]) -> str:
    """The exact text of ``ids``: special tokens kept, no clean-up of spaces."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
