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


def first_difference(a: str, b: str) -> int:
    """The index of the first character where ``a`` and ``b`` differ (the shorter one's length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


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
        at = first_difference(full, kept)
        raise ValueError(f"chat template: rendering the conversation changes text already in the context at "
                         f"character {at} (kept {kept[at:at + 40]!r}, template {full[at:at + 40]!r}); this template "
                         "rewrites earlier turns, so observations cannot be appended as a delta; use a template "
                         "that renders history verbatim")
    return list(tokenizer(full[len(kept):], add_special_tokens=False).input_ids)


def decode_kept(tokenizer, ids: list[int]) -> str:
    """The exact text of ``ids``: special tokens kept, no clean-up of spaces."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def probe_chat_template(tokenizer, template_kwargs: dict | None = None, *, tool_turn: bool = True) -> None:
    """Refuse (ValueError, one line) a chat template that cannot hold an episode as a growing token list.

    Renders a short conversation the way :func:`render_delta` does: a user turn, an assistant turn
    ending in whitespace (as a model's turn may) closed by EOS, then a tool turn (``tool_turn``) and a
    user turn; each render must start with the text already kept, and the template must accept the
    order.  Needs only the tokenizer, so it runs before any model loads."""
    kwargs = dict(template_kwargs or {})
    eos = tokenizer.eos_token or ""
    history = [{"role": "user", "content": "What is 2 + 3?"}]
    try:
        kept = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - jinja's errors, whatever the template raises
        raise ValueError(f"chat template: cannot render a user message ({type(e).__name__}: {e})") from None
    answer = "Let me check.  \n"
    kept += answer + eos
    history.append({"role": "assistant", "content": answer})
    follow = ([("tool", {"role": "tool", "name": "calculate", "content": "5"})] if tool_turn else []) + \
        [("user", {"role": "user", "content": "Are you sure?"})]
    for what, message in follow:
        try:
            full = tokenizer.apply_chat_template(history + [message], add_generation_prompt=True, tokenize=False,
                                                 **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"chat template: rejects a {what} message after an assistant turn ({type(e).__name__}: "
                             f"{e}); episodes need a template that takes the conversation's order") from None
        if not full.startswith(kept):
            at = first_difference(full, kept)
            raise ValueError(f"chat template: adding a {what} message rewrites text already in the context at "
                             f"character {at} (kept {kept[at:at + 30]!r}, template {full[at:at + 30]!r}); episodes "
                             "append each observation as a token delta and need a template that renders history "
                             "verbatim (trailing whitespace and reasoning included)")
        history.append(message)
        kept = full
        if what == "tool":  # the model answers the tool before the user speaks again
            kept += answer + eos
            history.append({"role": "assistant", "content": answer})
