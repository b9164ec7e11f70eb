"""Tools the model may call during an episode: loading, description, parsing, running.

* **Loading**: ``tools:`` lists plain Python functions as ``"module:function"`` or
  ``"path/to/file.py:function"``.  Anything that is not a function (a class, a constant, a
  callable object) is refused by name, as is a function whose signature and docstring give no
  JSON schema (``transformers.utils.get_json_schema``: type hints and a Google-style ``Args:``).
* **Description**: when the chat template renders ``tools=`` (detected by rendering with and
  without them and comparing), the schemas go there; otherwise they go into the system message
  with the call format (:func:`describe_tools`).
* **Parsing**: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the common form
  (Hermes, Qwen, SmolLM3).  Malformed JSON, an unclosed tag, an unknown tool or arguments that
  do not bind to the function's signature become an error observation, never an exception.
* **Running**: each call runs in a forked child process with a wall-clock limit; past it the
  child is killed (SIGKILL).  A thread could stop the *waiting* but not the runaway function,
  which would keep a core and its memory for the rest of the run and pile up with every call;
  a process is the one unit the OS lets us stop.  ``fork`` (not ``spawn``) because the function
  may come from a ``file.py`` that a fresh interpreter could not import by name, and because it
  pickles neither the function nor its arguments.  The child turns the result into text itself
  (``str``), cuts it to ``max_chars`` and sends only that back, so a 10 MB result never crosses
  the pipe and an object whose ``__str__`` raises is reported as unprintable.  The calls of one
  turn run concurrently (all children started, then collected against their deadlines), so a
  turn waits at most about one time limit.  Tools should be plain Python: a forked child of a
  process that uses CUDA or OpenMP threads must not touch them.

Every outcome that is not a clean result is counted by kind in ``ToolStats.errors``: malformed,
unknown_tool, bad_arguments, raised, timeout, unprintable, truncated, crashed.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .environments import Message, import_target

ERROR_KINDS = ("malformed", "unknown_tool", "bad_arguments", "raised", "timeout", "unprintable", "truncated",
               "crashed")
"""The ways a tool call can go wrong, each counted in ``ToolStats.errors``."""

CALL_FORMAT = '<tool_call>{"name": "<tool name>", "arguments": {<argument>: <value>, ...}}</tool_call>'


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with the schema it is described by."""

    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass
class ToolCall:
    """One call parsed from the model's text (or why it could not be made)."""

    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # None: ready to run; else an ERROR_KINDS entry
    message: str = ""  # what went wrong, shown to the model


@dataclass
class ToolResult:
    """What a call gave: the text appended to the context as a tool message, and its error kind."""

    name: str | None
    content: str
    error: str | None = None  # None, or an ERROR_KINDS entry

    def as_message(self) -> Message:
        return {"role": "tool", "name": self.name or "unknown", "content": self.content}


@dataclass
class ToolStats:
    """Counts across the calls of a run: every call, and every error by kind."""

    calls: int = 0
    errors: Counter = field(default_factory=Counter)

    def add(self, results: list[ToolResult]) -> None:
        self.calls += len(results)
        self.errors.update(r.error for r in results if r.error is not None)


def load_tool(spec: str | Callable[..., Any]) -> Tool:
    """The tool named by ``"module:function"`` / ``"file.py:function"`` (or a function), with its schema."""
    if isinstance(spec, str):
        if ":" not in spec or not spec.rpartition(":")[2]:
            raise ValueError(f"tool {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
        target, _, attr = spec.rpartition(":")
        module = import_target(target, what=f"tool {spec!r}")
        if not hasattr(module, attr):
            raise AttributeError(f"tool {spec!r}: {target!r} has no attribute {attr!r}")
        fn, label = getattr(module, attr), spec
    else:
        fn, label = spec, getattr(spec, "__name__", repr(spec))
    if not inspect.isfunction(fn):
        raise TypeError(f"tool {label!r}: a tool must be a plain Python function, got a {type(fn).__name__}")
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as e:  # the parser's own exception types vary across transformers versions
        raise ValueError(f"tool {label!r}: no JSON schema from its signature and docstring (needs type hints and "
                         f"an 'Args:' section naming every argument): {e}") from None
    return Tool(name=fn.__name__, fn=fn, schema=schema)


def load_tools(specs: list[str | Callable[..., Any]]) -> dict[str, Tool]:
    """name -> Tool for each spec; two tools with one name are an error."""
    tools: dict[str, Tool] = {}
    for spec in specs:
        tool = load_tool(spec)
        if tool.name in tools:
            raise ValueError(f"tools: two tools are named {tool.name!r}; tool names must be unique")
        tools[tool.name] = tool
    return tools


# ---------------------------------------------------------------------------------------------
# describing tools to the model


def template_takes_tools(tokenizer, tools: dict[str, Tool]) -> bool:
    """Whether the chat template renders ``tools=`` (its output changes when they are given)."""
    if not tools or getattr(tokenizer, "chat_template", None) is None:
        return False
    probe = [{"role": "user", "content": "x"}]
    plain = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    with_tools = tokenizer.apply_chat_template(probe, tools=[t.schema for t in tools.values()], tokenize=False,
                                               add_generation_prompt=True)
    return plain != with_tools


def describe_tools(tools: dict[str, Tool]) -> str:
    """The tools and the call format as text, for a system message (templates without ``tools=``)."""
    lines = ["You may call these tools. Each is described by a JSON schema:", "<tools>"]
    lines += [json.dumps(t.schema, ensure_ascii=False) for t in tools.values()]
    lines += ["</tools>", f"To call a tool, write {CALL_FORMAT}; its result comes back in a tool message."]
    return "\n".join(lines)


def with_tools(messages: list[Message], tools: dict[str, Tool], in_template: bool) -> tuple[list[Message], dict]:
    """(messages, extra apply_chat_template kwargs) describing ``tools`` either way.

    ``in_template``: the schemas go to the template as ``tools=``; otherwise :func:`describe_tools`
    is appended to the first system message (or becomes one)."""
    if not tools:
        return messages, {}
    if in_template:
        return messages, {"tools": [t.schema for t in tools.values()]}
    text = describe_tools(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + messages[1:], {}
    return [{"role": "system", "content": text}] + messages, {}


# ---------------------------------------------------------------------------------------------
# parsing

_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, tools: dict[str, Tool]) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` in ``text``, in order; an unclosed last tag is malformed."""
    calls = [_parse_one(body, tools) for body in _CALL_RE.findall(text)]
    if "<tool_call>" in _CALL_RE.sub("", text):
        calls.append(ToolCall(None, error="malformed", message="tool call without a closing </tool_call>"))
    return calls


def _parse_one(body: str, tools: dict[str, Tool]) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(None, error="malformed", message=f"tool call is not valid JSON ({e.msg}); write {CALL_FORMAT}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, error="malformed", message=f"tool call needs a string 'name'; write {CALL_FORMAT}")
    name, args = obj["name"], obj.get("arguments", {})
    if name not in tools:
        return ToolCall(name, error="unknown_tool", message=f"no tool named {name!r}; tools: {sorted(tools)}")
    if not isinstance(args, dict):
        return ToolCall(name, error="bad_arguments", message=f"'arguments' of {name} must be a JSON object")
    try:
        inspect.signature(tools[name].fn).bind(**args)
    except TypeError as e:
        return ToolCall(name, args, error="bad_arguments", message=f"bad arguments for {name}: {e}")
    return ToolCall(name, args)


# ---------------------------------------------------------------------------------------------
# running


@dataclass(frozen=True)
class ToolLimits:
    """How long a call may run and how much of its result the model sees."""

    timeout_s: float = 5.0
    """Wall-clock seconds per call; past it the call's process is killed."""
    max_chars: int = 2000
    """Characters of the result kept; longer results are cut and marked truncated."""


def run_tool_calls(calls: list[ToolCall], tools: dict[str, Tool], limits: ToolLimits = ToolLimits(),
                   stats: ToolStats | None = None) -> list[ToolResult]:
    """One result per call, in order; never raises for what a tool does, never waits past the time limit
    (plus the time to fork and kill).  Calls that failed to parse give their error message as the result."""
    ctx = multiprocessing.get_context("fork")
    started: list[tuple[int, Any, Any, float]] = []  # (index, process, parent end of the pipe, deadline)
    results: list[ToolResult | None] = [None] * len(calls)
    for i, call in enumerate(calls):
        if call.error is not None:
            results[i] = ToolResult(call.name, f"error: {call.message}", call.error)
            continue
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(tools[call.name].fn, call.arguments, limits.max_chars, send),
                           daemon=True)
        with warnings.catch_warnings():  # "multi-threaded process, fork() may deadlock": tools are plain Python
            warnings.simplefilter("ignore", DeprecationWarning)
            proc.start()
        send.close()
        started.append((i, proc, recv, time.monotonic() + limits.timeout_s))
    for i, proc, recv, deadline in started:
        results[i] = _collect(calls[i].name, proc, recv, deadline, limits)
    if stats is not None:
        stats.add(results)
    return results


def _collect(name: str, proc, recv, deadline: float, limits: ToolLimits) -> ToolResult:
    try:
        ready = recv.poll(max(0.0, deadline - time.monotonic()))
        payload = recv.recv() if ready else None
    except (EOFError, OSError):  # the child died without sending (os._exit, a signal, out of memory)
        payload = ("crashed", f"the tool process ended without a result (exit code {proc.exitcode})", 0)
    finally:
        recv.close()
        if proc.is_alive():
            proc.kill()
        proc.join()
    if payload is None:
        return ToolResult(name, f"error: {name} ran past its time limit of {limits.timeout_s:g} s and was stopped",
                          "timeout")
    kind, text, full_len = payload
    if kind == "ok":
        return ToolResult(name, text)
    if kind == "truncated":
        return ToolResult(name, f"{text}\n[truncated: {full_len} characters, first {limits.max_chars} shown]",
                          "truncated")
    return ToolResult(name, f"error: {text}", kind)


def _child(fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int, send) -> None:
    """In the forked process: run, turn the result into at most ``max_chars`` of text, send (kind, text, length)."""
    try:
        try:
            value = fn(**arguments)
        except BaseException as e:  # noqa: BLE001 - whatever the tool does is reported, not raised
            msg = _safe_str(e)
            send.send(("raised", f"{type(e).__name__}: {msg}"[:max_chars], 0))
            return
        text = value if isinstance(value, str) else _safe_str(value, None)
        if text is None:
            send.send(("unprintable", f"the result (a {type(value).__name__}) cannot be shown as text", 0))
        elif len(text) > max_chars:
            send.send(("truncated", text[:max_chars], len(text)))
        else:
            send.send(("ok", text, len(text)))
    finally:
        send.close()
        os._exit(0)


def _safe_str(value: Any, default: str | None = "<unprintable>") -> str | None:
    try:
        text = str(value)
    except BaseException:  # noqa: BLE001
        return default
    return text if isinstance(text, str) else default
