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
* **Running**: an environment's own methods (``Tool.method``) run in-process on the episode's
  instance (:mod:`.env_adapters`); every function tool runs in a forked child process, and no more than ``max_calls`` per turn
  nor ``max_parallel`` at once (every call forks the trainer).  A thread could stop the *waiting*
  but not a runaway function; a process is the one unit the OS lets us stop.  ``fork`` (not
  ``spawn``) because the function may come from a ``file.py`` that a fresh interpreter could not
  import by name, and because the function and its arguments then need no serialising.  The child
  makes a process group of its own (``setsid``), puts back the default handlers of the signals the
  trainer handles in Python (its SIGTERM handler would otherwise keep a tool alive), points every
  descriptor it inherited at /dev/null (the run lock's too: a tool's leftover process must not hold
  it), sends stdout and stderr to a file of its own (read back, cut, into ``ToolResult.output``,
  never into the trainer's log), and sets ``setrlimit`` limits (:class:`ToolLimits`).  It turns the
  result into text itself (``str``), cuts it to ``max_chars`` and sends that back as length-prefixed
  UTF-8 JSON (bytes, no pickle), so a 10 MB result never crosses the pipe and an object whose
  ``__str__`` raises is reported as unprintable.  When the result is in, or the time limit passed,
  the whole process group is killed (SIGKILL): nothing a tool started stays behind, unless it left
  the group on purpose.  Tools should be plain Python: a forked child of a process that uses CUDA
  or OpenMP threads must not touch them.

**Not a sandbox.**  A tool runs with the user's permissions: it can read and write their files and
reach the network.  The limits keep a buggy tool from taking the trainer down; they do not contain
hostile code.  Code the model writes, or any tool you do not trust, belongs in a container.

Every outcome that is not a clean result is counted by kind in ``ToolStats.errors``: malformed,
unknown_tool, bad_arguments, too_many_calls, raised, timeout, unprintable, truncated, crashed.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import resource
import selectors
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .environments import Message, import_target

ERROR_KINDS = ("malformed", "unknown_tool", "bad_arguments", "too_many_calls", "raised", "timeout", "unprintable",
               "truncated", "crashed")
"""The ways a tool call can go wrong, each counted in ``ToolStats.errors``."""

CALL_FORMAT = '<tool_call>{"name": "<tool name>", "arguments": {<argument>: <value>, ...}}</tool_call>'


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with the schema it is described by."""

    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}
    method: bool = False
    """A method of the environment (:mod:`.env_adapters`): run in-process on each episode's own instance."""


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
    output: str = ""  # what the call printed (stdout and stderr), cut to ToolLimits.max_chars; not shown to the model
    arguments: dict[str, Any] = field(default_factory=dict)  # the call's arguments (what an environment is shown)

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


def parse_tool_calls(text: str, tools: dict[str, Tool], max_calls: int | None = None) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` in ``text``, in order; an unclosed last tag is malformed.

    Past ``max_calls`` (the calls of one turn that may run) a call is not parsed: it is a
    ``too_many_calls`` error."""
    bodies = _CALL_RE.findall(text)
    unclosed = "<tool_call>" in _CALL_RE.sub("", text)
    keep = len(bodies) + unclosed if max_calls is None else max_calls
    calls = [_parse_one(body, tools) for body in bodies[:keep]]
    if unclosed and len(bodies) < keep:
        calls.append(ToolCall(None, error="malformed", message="tool call without a closing </tool_call>"))
    calls += [ToolCall(None, error="too_many_calls", message=f"at most {max_calls} tool calls run per turn; this one "
                       "was not run") for _ in range(len(bodies) + unclosed - len(calls))]
    return calls


def _parse_one(body: str, tools: dict[str, Tool]) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(None, error="malformed", message=f"tool call is not valid JSON ({e.msg}); write {CALL_FORMAT}")
    except (ValueError, RecursionError) as e:  # an integer past Python's digit limit; nesting past the stack's
        why = "nested too deeply" if isinstance(e, RecursionError) else "a number too long to read"
        return ToolCall(None, error="malformed", message=f"tool call is not valid JSON ({why}); write {CALL_FORMAT}")
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
    """How a turn's calls run: how many, how long, with what resources, and how much of their result is kept.

    The resource limits are ``setrlimit`` limits set in each call's process; 0 leaves one unset."""

    timeout_s: float = 5.0
    """Wall-clock seconds per call; past it the call's process group is killed."""
    max_chars: int = 2000
    """Characters of the result kept; longer results are cut and marked truncated."""
    max_calls: int = 8
    """Calls run per model turn; the calls after them get an error (too_many_calls)."""
    max_parallel: int = 4
    """Call processes alive at once; further calls wait for one to end."""
    memory_mb: int = 1024
    """Address space a call may add to its copy of the trainer (RLIMIT_AS); past it allocations fail."""
    cpu_s: int = 60
    """CPU seconds of a call's process (RLIMIT_CPU); past them it is killed (SIGXCPU)."""
    file_mb: int = 64
    """Largest file a call may write (RLIMIT_FSIZE), its captured output included."""
    max_processes: int = 16
    """Processes (threads included) a call may start besides those its user already runs (RLIMIT_NPROC,
    which the OS counts per user and does not apply to root)."""


def run_tool_calls(calls: list[ToolCall], tools: dict[str, Tool], limits: ToolLimits = ToolLimits(),
                   stats: ToolStats | None = None) -> list[ToolResult]:
    """One result per call, in order; never raises for what a tool does.  At most ``limits.max_parallel``
    calls run at once, each in its own process group, never waited for past its time limit (counted
    from its start).  Calls that failed to parse give their error message as the result."""
    results: list[ToolResult | None] = [None] * len(calls)
    waiting = []
    for i, call in enumerate(calls):
        if call.error is not None:
            results[i] = ToolResult(call.name, f"error: {call.message}", call.error)
        else:
            waiting.append(i)
    waiting.reverse()
    user_tasks = _user_tasks() if limits.max_processes and waiting else None
    running: dict[int, _Running] = {}  # result pipe's read end -> call
    with selectors.DefaultSelector() as sel:
        try:
            while waiting or running:
                while waiting and len(running) < limits.max_parallel:
                    i = waiting.pop()
                    try:
                        run = _start(i, tools[calls[i].name].fn, calls[i].arguments, limits, user_tasks)
                    except OSError as e:  # no process to be had (EAGAIN, ENOMEM), no temporary file
                        results[i] = ToolResult(calls[i].name, f"error: the tool process could not start ({e})",
                                                "crashed")
                        continue
                    running[run.fd] = run
                    sel.register(run.fd, selectors.EVENT_READ, run)
                if not running:
                    continue
                wait = min(r.deadline for r in running.values()) - time.monotonic()
                for key, _ in sel.select(max(0.0, wait)):
                    key.data.read()
                now = time.monotonic()
                for run in [r for r in running.values() if r.complete or r.eof or now >= r.deadline]:
                    sel.unregister(run.fd)
                    del running[run.fd]
                    results[run.index] = run.finish(calls[run.index].name, limits)
        finally:  # an exception here (Ctrl-C) leaves no call running
            for run in running.values():
                run.finish(calls[run.index].name, limits)
    if stats is not None:
        stats.add(results)
    return results


_HEADER = 8  # the child sends len(payload) as 8 bytes, then the payload (UTF-8 JSON)


class _Running:
    """One call's process: its pid (and process group), the read end of its result pipe, its output file."""

    def __init__(self, index: int, pid: int, fd: int, output, deadline: float, max_bytes: int):
        self.index, self.pid, self.fd, self.output, self.deadline = index, pid, fd, output, deadline
        self.max_bytes, self.data, self.eof = max_bytes, bytearray(), False

    @property
    def complete(self) -> bool:
        return len(self.data) >= _HEADER and len(self.data) >= _HEADER + int.from_bytes(self.data[:_HEADER], "big")

    def read(self) -> None:
        chunk = os.read(self.fd, 1 << 16)
        self.eof = not chunk
        self.data += chunk
        if len(self.data) > self.max_bytes + _HEADER:  # more than any honest payload: stop reading
            self.eof = True

    def finish(self, name: str | None, limits: ToolLimits) -> ToolResult:
        """Kill the process group (whatever the call left running), reap the process, read what it sent."""
        for kill in (os.killpg, os.kill):  # the group; and the process, if it had not made its group yet
            try:
                kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        with self.output:
            output = os.pread(self.output.fileno(), 4 * limits.max_chars, 0).decode("utf-8", "replace")
        result = self._result(name, limits, status)
        result.output = output[:limits.max_chars]
        return result

    def _result(self, name: str | None, limits: ToolLimits, status: int) -> ToolResult:
        if self.complete:
            size = int.from_bytes(self.data[:_HEADER], "big")
            try:
                kind, text, full_len = json.loads(self.data[_HEADER:_HEADER + size].decode("utf-8"))
            except (ValueError, RecursionError, TypeError):
                return ToolResult(name, "error: the tool process sent an unreadable result", "crashed")
            return _as_result(name, kind, text, full_len, limits.max_chars)
        if not self.eof:
            return ToolResult(name, f"error: {name} ran past its time limit of {limits.timeout_s:g} s and was "
                              "stopped", "timeout")
        code = os.waitstatus_to_exitcode(status)
        how = f"exit code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        if code == -signal.SIGXCPU:
            how += f", its CPU time limit of {limits.cpu_s} s"
        return ToolResult(name, f"error: the tool process ended without a result ({how})", "crashed")


def _start(index: int, fn: Callable[..., Any], arguments: dict[str, Any], limits: ToolLimits,
           user_tasks: int | None) -> _Running:
    """Fork the process of one call; it runs :func:`_child` and never returns here."""
    output = tempfile.TemporaryFile()  # the call's stdout and stderr; read back (cut) by the parent
    read_fd, write_fd = os.pipe()
    try:
        with warnings.catch_warnings():  # "multi-threaded process, fork() may deadlock": tools are plain Python
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:
        for fd in (read_fd, write_fd):
            os.close(fd)
        output.close()
        raise
    if pid == 0:  # pragma: no cover - the child; coverage cannot follow it
        code = 1
        try:
            os.close(read_fd)
            _child(fn, arguments, limits, user_tasks, write_fd, output.fileno())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return _Running(index, pid, read_fd, output, time.monotonic() + limits.timeout_s, 8 * limits.max_chars + 256)


def _child(fn: Callable[..., Any], arguments: dict[str, Any], limits: ToolLimits, user_tasks: int | None,
           result_fd: int, output_fd: int) -> None:
    """In the call's process: a process group of its own, default signal handlers, no descriptor of the
    trainer's, stdout/stderr to the output file, the resource limits; then run and send the result."""
    os.setsid()
    for sig in _python_handled_signals():
        signal.signal(sig, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    _release_inherited_fds(keep={0, 1, 2, result_fd}, null=null)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    _set_limits(limits, user_tasks)
    payload = json.dumps(_call(fn, arguments, limits.max_chars), ensure_ascii=False).encode("utf-8")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    data = len(payload).to_bytes(_HEADER, "big") + payload
    while data:
        data = data[os.write(result_fd, data):]


def _as_result(name: str | None, kind: str, text: str, full_len: int, max_chars: int) -> ToolResult:
    if kind == "ok":
        return ToolResult(name, text)
    if kind == "truncated":
        return ToolResult(name, f"{text}\n[truncated: {full_len} characters, first {max_chars} shown]", "truncated")
    return ToolResult(name, f"error: {text}", kind)


def call_to_result(name: str | None, fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int) -> ToolResult:
    """``fn(**arguments)`` in this process, as a ToolResult: its text cut to ``max_chars``, or why there is none
    (what it raises is the result's error, never raised here)."""
    return _as_result(name, *_call(fn, arguments, max_chars), max_chars)


def _call(fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int) -> list:
    """[kind, text, full length]: the result as at most ``max_chars`` of text, or why there is none."""
    try:
        value = fn(**arguments)
    except BaseException as e:  # noqa: BLE001 - whatever the tool does is reported, not raised
        return ["raised", f"{type(e).__name__}: {_safe_str(e)}"[:max_chars], 0]
    text = value if isinstance(value, str) else _safe_str(value, None)
    if text is None:
        return ["unprintable", f"the result (a {type(value).__name__}) cannot be shown as text", 0]
    if len(text) > max_chars:
        return ["truncated", text[:max_chars], len(text)]
    return ["ok", text, len(text)]


def _python_handled_signals() -> list[int]:
    """Signals whose handler is a Python function (the trainer's stop and checkpoint handlers, SIGINT's
    KeyboardInterrupt): in a tool's process they would keep it alive, so they go back to the default."""
    out = []
    for sig in signal.valid_signals():
        try:
            if callable(signal.getsignal(sig)):
                out.append(sig)
        except (ValueError, OSError):
            pass
    return out


def _release_inherited_fds(keep: set[int], null: int) -> None:
    """Point every descriptor inherited from the trainer (the run lock's among them) at /dev/null.

    Closing them would let the tool's next ``open`` reuse a number that a Python object of the
    trainer still writes to; pointing them at /dev/null releases the files and keeps the numbers."""
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    try:
        fds = [int(name) for name in os.listdir(fd_dir)]
    except OSError:  # no listing: every number up to the limit
        fds = list(range(resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    for fd in fds:
        if fd not in keep and fd != null:
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:  # not open (the listing's own descriptor, now closed)
                pass
    os.close(null)


def _set_limits(limits: ToolLimits, user_tasks: int | None) -> None:
    """The call's setrlimit limits; each only lowers the current one.  Memory counts from the address space
    the process starts with (its copy of the trainer), processes from those the user already runs."""
    wanted = []
    mapped = _address_space()
    if limits.memory_mb and mapped:  # unknown (no /proc): a limit could fall below what is mapped already
        wanted.append((resource.RLIMIT_AS, mapped + limits.memory_mb * 2**20))
    if limits.cpu_s:
        wanted.append((resource.RLIMIT_CPU, limits.cpu_s))
    if limits.file_mb:
        wanted.append((resource.RLIMIT_FSIZE, limits.file_mb * 2**20))
    if limits.max_processes and user_tasks is not None and hasattr(resource, "RLIMIT_NPROC"):
        wanted.append((resource.RLIMIT_NPROC, user_tasks + limits.max_processes))
    for res, value in wanted:
        soft, hard = resource.getrlimit(res)
        value = min([value] + [v for v in (soft, hard) if v != resource.RLIM_INFINITY])
        # CPU: SIGXCPU at the soft limit (named in the result), SIGKILL a second later if it is ignored
        grace = 1 if res == resource.RLIMIT_CPU and (hard == resource.RLIM_INFINITY or value < hard) else 0
        try:
            resource.setrlimit(res, (value, value + grace))
        except (ValueError, OSError):  # a platform that refuses this one: the others still hold
            pass


def _address_space() -> int:
    """Bytes of address space this process has mapped (0 where /proc does not say: Linux only)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _user_tasks() -> int | None:
    """Processes and threads of this user, as RLIMIT_NPROC counts them (None where /proc cannot say)."""
    uid, total = os.getuid(), 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                total += int(f.read().rsplit(b")", 1)[1].split()[17])  # num_threads, field 20
        except (OSError, ValueError, IndexError):
            pass
    return total


def _safe_str(value: Any, default: str | None = "<unprintable>") -> str | None:
    try:
        text = str(value)
    except BaseException:  # noqa: BLE001
        return default
    return text if isinstance(text, str) else default
