"""Demonstrations: JSONL rows -> rendered token rows with an action mask on the assistant's tokens.

Two row formats, as TRL's SFT datasets hold them:

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ..., "tool_calls": [...]}, ...]}
    {"prompt": str | [messages], "completion": str | [messages]}

Every assistant message of ``messages`` is trained; of a prompt/completion row, the completion's.
An assistant's ``tool_calls`` (``{"type": "function", "function": {"name", "arguments"}}``,
arguments a JSON object or a JSON string) are written as the tool parser reads them
(``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, :mod:`seqpg.rollout.tools`) unless the
chat template renders ``tool_calls`` itself.  The system prompt and the tools' description are added
as an episode adds them (``sampling.system_prompt``, ``episode.tools``), so the model sees in training
the context it will see in RL.

Rendering: the chat template renders the whole conversation ONCE, and the text is tokenised ONCE,
with character offsets.  An assistant turn's characters are found by rendering the conversation
before it with the generation prompt (its start) and through it (its end); the kept prefix must be
a prefix of the whole render (a template that rewrites earlier turns is refused).  A turn's trained
characters are its content and its end-of-turn token (the EOS the model writes to end a turn), not
the template's text after it.  A token is an action when its first character lies in a trained
span, so the actions are exactly the tokens the model must write in an episode.

Every problem with a row is one line naming the file and line (``DemoError``).
"""

from __future__ import annotations

import dataclasses

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..batch import Prompt, RolloutBatch
from ..rollout.environments import Message
from ..rollout.sampling import left_pad, uses_chat_template
from ..rollout.tools import Tool, template_takes_tools, with_tools

ROLES = ("system", "user", "assistant", "tool")


class DemoError(ValueError):
    """A demonstration file or row that cannot be trained on; the message names the file and line."""


@dataclass(frozen=True)
class Conversation:
    """One row, checked: its messages and which of them are trained."""

    line: int
    """1-based line of the row in its file."""
    messages: list[Message]
    trained: tuple[int, ...]
    """Indices of the assistant messages trained on."""


@dataclass(frozen=True)
class Demo:
    """One rendered row: its tokens, which of them are actions (the assistant's), and its text."""

    line: int
    ids: list[int]
    action: list[bool]
    text: str

    @property
    def num_actions(self) -> int:
        return sum(self.action)


# ---------------------------------------------------------------------------------------------
# reading and checking rows


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every row of the JSONL file ``path``, checked (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DemoError(f"demonstrations {str(p)!r} do not exist" if not p.exists()
                        else f"demonstrations {str(p)!r} is not a file; give a JSONL file")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DemoError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line") from None
        rows.append(conversation(row, n, where))
    if not rows:
        raise DemoError(f"demonstrations {str(p)!r} hold no rows; one JSON object per line")
    return rows


def conversation(row: Any, line: int, where: str) -> Conversation:
    """The checked :class:`Conversation` of one parsed row."""
    if not isinstance(row, dict):
        raise DemoError(f"{where}: a row must be a JSON object with `messages` or `prompt` and `completion`")
    if "messages" in row:
        messages = _messages(row["messages"], where, "messages")
        trained = tuple(i for i, m in enumerate(messages) if m["role"] == "assistant")
    elif "prompt" in row and "completion" in row:
        prompt = _as_turns(row["prompt"], "user", where, "prompt")
        completion = _as_turns(row["completion"], "assistant", where, "completion")
        messages = prompt + completion
        trained = tuple(len(prompt) + i for i, m in enumerate(completion) if m["role"] == "assistant")
    else:
        raise DemoError(f"{where}: the row has keys {sorted(row)}; give `messages` (a chat) or `prompt` and "
                        "`completion`")
    if not trained:
        raise DemoError(f"{where}: no assistant message to train on; add one with role `assistant`")
    if trained[0] == 0 or all(messages[i]["role"] == "system" for i in range(trained[0])):
        raise DemoError(f"{where}: the first assistant message has no user message before it; the model needs a "
                        "prompt to answer")
    for i in trained:
        m = messages[i]
        if not m.get("content") and not m.get("tool_calls"):
            raise DemoError(f"{where}: message {i + 1} (assistant) is empty; give it content or tool_calls")
    return Conversation(line, messages, trained)


def _as_turns(value: Any, role: str, where: str, key: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise DemoError(f"{where}: `{key}` is empty")
        return [{"role": role, "content": value}]
    return _messages(value, where, key)


def _messages(value: Any, where: str, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DemoError(f"{where}: `{key}` must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise DemoError(f"{where}: {key} message {i} is not an object")
        if "role" not in m:
            raise DemoError(f"{where}: {key} message {i} has no `role`; give one of {', '.join(ROLES)}")
        if m["role"] not in ROLES:
            raise DemoError(f"{where}: {key} message {i} has role {m['role']!r}; give one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise DemoError(f"{where}: {key} message {i}: `content` must be a string")
        msg = {k: v for k, v in m.items() if v is not None}
        msg.setdefault("content", "")
        if "tool_calls" in msg:
            if m["role"] != "assistant":
                raise DemoError(f"{where}: {key} message {i}: only assistant messages have tool_calls")
            msg["tool_calls"] = [_tool_call(c, where, f"{key} message {i}") for c in msg["tool_calls"] or []]
        out.append(msg)
    return out


def _tool_call(call: Any, where: str, what: str) -> dict[str, Any]:
    """``{"type": "function", "function": {"name", "arguments": dict}}`` (arguments given as a JSON string parsed)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DemoError(f"{where}: {what}: a tool call needs function.name (a string)")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise DemoError(f"{where}: {what}: tool call {fn['name']!r} has arguments that are not JSON ({e.msg})") \
                from None
    if not isinstance(args, dict):
        raise DemoError(f"{where}: {what}: tool call {fn['name']!r}: arguments must be a JSON object")
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


# ---------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class RenderSettings:
    """How conversations are rendered: as the episode sampler renders them (``from_config``)."""

    chat_template: bool | None = None
    """The template's use: True, False, or None (the tokenizer's template when it has one)."""
    system_prompt: str | None = None
    tools: tuple[Tool, ...] = ()
    max_length: int = 2048


def tool_call_text(call: dict[str, Any]) -> str:
    """A tool call as the model writes it for :func:`seqpg.rollout.tools.parse_tool_calls`."""
    fn = call["function"]
    return "<tool_call>" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}) + "</tool_call>"


def template_renders_tool_calls(tokenizer) -> bool:
    """Whether the chat template writes an assistant's ``tool_calls`` itself (else they go into its content)."""
    probe = [{"role": "user", "content": "x"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "seqpg_probe_tool", "arguments": {}}}]}]
    return "seqpg_probe_tool" in tokenizer.apply_chat_template(probe, tokenize=False)


def as_template_messages(conv: Conversation, s: RenderSettings, tokenizer) -> tuple[list[Message], list[int], dict]:
    """(messages, indices of the trained ones, template kwargs): system prompt and tools added as
    :func:`seqpg.rollout.multiturn.sample_episodes` adds them; tool calls as text unless the template writes them."""
    native = s.chat_template and template_renders_tool_calls(tokenizer)
    messages = []
    for m in conv.messages:
        if m.get("tool_calls") and not native:
            calls = "".join(tool_call_text(c) for c in m["tool_calls"])
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (m["content"] + "\n" + calls) if m["content"] else calls
        messages.append(m)
    trained = list(conv.trained)
    if s.system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": s.system_prompt}] + messages
        trained = [i + 1 for i in trained]
    kwargs: dict = {}
    if s.tools and s.chat_template:
        tools = {t.name: t for t in s.tools}
        in_template = template_takes_tools(tokenizer, tools)
        added = not in_template and messages[0]["role"] != "system"
        messages, kwargs = with_tools(messages, tools, in_template)
        trained = [i + 1 for i in trained] if added else trained
    return messages, trained, kwargs


def trained_spans(tokenizer, messages: list[Message], trained: list[int], kwargs: dict,
                  chat_template: bool) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's text, the [start, end) characters of each trained turn)."""
    eos = tokenizer.eos_token or ""
    if not chat_template:  # contents as they are (as an episode without a template); a trained turn ends with EOS
        text, spans = "", []
        for i, m in enumerate(messages):
            if i in trained:
                spans.append((len(text), len(text) + len(m["content"]) + len(eos)))
                text += m["content"] + eos
            else:
                text += m["content"]
        return text, spans

    def render(msgs: list[Message], generation: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation, **kwargs)

    full = render(messages, False)
    spans = []
    for i in trained:
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise ValueError(f"the chat template renders message {i + 1} differently once later messages follow; "
                             "it rewrites earlier turns, so a turn's tokens cannot be located; use a template that "
                             "renders history verbatim")
        end = through.rfind(eos, len(before)) if eos else -1
        spans.append((len(before), end + len(eos) if end >= 0 else len(through)))
    return full, spans


def render_demo(tokenizer, conv: Conversation, s: RenderSettings, where: str) -> Demo:
    """The row rendered once, tokenised once; its actions are the tokens starting inside a trained span."""
    try:  # sampling.chat_template null: the tokenizer's template when it has one, as episodes decide it
        s = dataclasses.replace(s, chat_template=uses_chat_template(tokenizer, s.chat_template))
    except ValueError as e:
        raise DemoError(f"{where}: {e}") from None
    messages, trained, kwargs = as_template_messages(conv, s, tokenizer)
    try:
        text, spans = trained_spans(tokenizer, messages, trained, kwargs, s.chat_template)
    except ValueError as e:
        raise DemoError(f"{where}: {e}") from None
    enc = tokenizer(text, add_special_tokens=not s.chat_template, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if len(ids) > s.max_length:
        raise DemoError(f"{where}: {len(ids)} tokens rendered, over the limit of {s.max_length} (sft.max_length, or "
                        "the model's context if shorter); shorten the row or raise sft.max_length")
    action = [False] * len(ids)
    for k, (start, end) in enumerate(spans):
        hit = [t for t, (a, b) in enumerate(offsets) if start <= a < end and b > a]
        if not hit:
            raise DemoError(f"{where}: trained assistant turn {k + 1} has no tokens of its own")
        for t in hit:
            action[t] = True
    if action[0]:
        raise DemoError(f"{where}: the first token is the assistant's; the model needs a prompt before it")
    return Demo(conv.line, ids, action, text)


def load_demos(path: str | Path, tokenizer, s: RenderSettings) -> list[Demo]:
    """Every row of ``path`` read, checked and rendered (see the module docstring)."""
    return [render_demo(tokenizer, conv, s, f"{path} line {conv.line}") for conv in read_conversations(path)]


# ---------------------------------------------------------------------------------------------
# as a batch


def demos_batch(demos: list[Demo], pad_id: int, *, tokenizer=None) -> RolloutBatch:
    """The demos as a :class:`RolloutBatch`: prompt = the tokens before the first action (left-padded),
    completion = from there to the last action (right-padded), ``completion_mask_BC`` = the actions (holes
    where tool and user turns sit, as in an episode).  Sample log-probs are 0 (nothing was sampled);
    each row is its own group."""
    if not demos:
        raise ValueError("demos_batch: no demonstrations")
    prompts, completions, masks = [], [], []
    for d in demos:
        first = d.action.index(True)
        last = len(d.action) - 1 - d.action[::-1].index(True)
        prompts.append(d.ids[:first])
        completions.append(d.ids[first:last + 1])
        masks.append(d.action[first:last + 1])
    prompt_ids_BP, prompt_mask_BP = left_pad(prompts, pad_id)
    B, C = len(demos), max(len(c) for c in completions)
    completion_ids_BC = torch.full((B, C), pad_id, dtype=torch.long)
    completion_mask_BC = torch.zeros((B, C), dtype=torch.bool)
    for i, (c, m) in enumerate(zip(completions, masks)):
        completion_ids_BC[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask_BC[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    texts = [tokenizer.decode(c, skip_special_tokens=True) if tokenizer is not None else "" for c in completions]
    return RolloutBatch(
        prompts=[Prompt(text=d.text, id=f"line-{d.line}") for d in demos], completions=texts,
        prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP, completion_ids_BC=completion_ids_BC,
        completion_mask_BC=completion_mask_BC, sample_logprobs_BC=torch.zeros((B, C)),
        group_ids_B=torch.arange(B), finished_B=torch.ones(B, dtype=torch.bool))
