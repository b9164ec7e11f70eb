"""Environments as users already write them, behind one interface: :class:`EpisodeEnv`.

Three shapes of class are accepted on the same ``episode.env`` line, told apart once per class
(:func:`env_kind`):

* **seqpg**: ``reset(prompt, seed) -> observation``, ``step(model_text) -> (obs, reward, done, info)``
  (or a :class:`~.environments.StepResult`).
* **gymnasium**: ``reset(*, seed=None, options=None) -> (obs, info)`` (the first parameter after
  ``self`` is named ``seed``; ``options`` gets the task row), ``step(action) -> (obs, reward,
  terminated, truncated, info)``.  Any kind's ``reset`` may return ``(obs, info)`` and any ``step``
  the 5-tuple.
* **trl** (TRL's ``environment_factory``): no ``step``; ``reset(**row)`` gets the task row (``prompt``
  and the prompt file's other columns) and returns a string appended to the prompt, or None.  The
  model's first turn without a tool call ends the episode.

Every kind may have **stateful tools**: its public methods (not ``_private``, not the reserved
names below) are tools, described by their signature and docstring like free-function tools and
called on THAT episode's instance.  Reserved: ``reset``, ``step``, ``tool_step``, ``get_reward``,
``close``, ``render``, ``seed``.  ``tool_step(model_text, results)``, when defined, sees each turn
answered by tools (each :class:`~.tools.ToolResult` carries the call's name, arguments, content and
error) and may return None, a reward, or a step result (its observation follows the tool messages;
``done`` ends the episode).  ``get_reward()``, when defined, is read once when the episode ends (done
or cut at a limit) and added to its last turn's reward, as TRL reads it.

**In-process, with a time limit.**  An environment's own methods must mutate its instance, so they
run in the trainer's process, never forked (free-function tools stay in the forked runner of
:mod:`.tools`).  Each call (``reset``, ``step``, ``tool_step``, ``get_reward``, a method tool) runs on
a fresh daemon thread that the sampler waits for at most ``timeout_s``; past it the call is
abandoned and the episode fails (:class:`EnvCallError`).  Why a thread and not ``signal.alarm``: an
alarm works only on the main thread, interrupts whatever Python code is running (the trainer's own
included) and cannot stop C code either; a thread is safe to walk away from.  Its limit: an
abandoned call is not stopped; it keeps its CPU and memory until it returns, and the instance it
holds is never used again.  Calls run one at a time, in episode order, so environments sharing
module state stay reproducible; a turn waits at most (episodes x ``timeout_s``) when every call hangs.
"""

from __future__ import annotations

import inspect
import math
import threading
from typing import Any

from seqpg.batch import Prompt

from .environments import Message, StepResult, as_messages, env_kind, reset_params
from .tools import Tool, ToolResult, call_to_result

RESERVED = frozenset({"reset", "step", "tool_step", "get_reward", "close", "render", "seed"})
"""Public method names of an environment that are never tools."""

class EnvCallError(Exception):
    """A call into an environment raised, ran past its time limit or returned something unusable."""


def _defined_by_library(cls: type, name: str) -> bool:
    """Whether ``name`` comes from gymnasium's (or gym's) own base classes, not the user's class."""
    for base in cls.__mro__:
        if name in vars(base):
            return base.__module__.split(".")[0] in ("gymnasium", "gym")
    return False


def method_tools(env: Any, *, spec: str) -> dict[str, Tool]:
    """name -> Tool for each public method of the instance ``env`` (see the module docstring), its schema from
    the signature and docstring; a public method without a schema is refused by name."""
    from transformers.utils import get_json_schema

    cls, tools = type(env), {}
    for name, member in inspect.getmembers(env, inspect.ismethod):
        if name.startswith("_") or name in RESERVED or _defined_by_library(cls, name):
            continue
        try:
            schema = get_json_schema(member)
        except Exception as e:  # the parser's own exception types vary across transformers versions
            raise ValueError(f"environment {spec}: public method {name!r} is a tool (every public method of an "
                             f"environment is) but has no JSON schema ({e}); give it type hints and an 'Args:' "
                             f"docstring, or make it private (_{name})") from None
        tools[name] = Tool(name=name, fn=member, schema=schema, method=True)
    return tools


def merge_tools(free: dict[str, Tool], methods: dict[str, Tool]) -> dict[str, Tool]:
    """The run's tools: free functions and the environment's methods; one name used twice is an error."""
    clash = sorted(set(free) & set(methods))
    if clash:
        raise ValueError(f"tools: {clash} is both a tool function and a method of the environment; rename one")
    return {**free, **methods}


def call_with_timeout(fn, *args, timeout_s: float, what: str, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` on a daemon thread, waited for at most ``timeout_s`` (see the module docstring).
    What it raises is raised here; past the limit an :class:`EnvCallError` (the call is abandoned)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name=f"seqpg-env {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise EnvCallError(f"{what} ran past its time limit of {timeout_s:g} s (episode.env_timeout_s) and was "
                           "abandoned")
    if "error" in box:
        raise box["error"]
    return box["value"]


def env_reward(value: Any, where: str) -> float:
    """A reward from an environment as a float: bools, strings and non-finite numbers are refused, as for scorers."""
    if value is None or isinstance(value, (str, bytes, bool)) or type(value).__name__ == "bool_":
        raise EnvCallError(f"{where} returned reward {value!r} ({type(value).__name__}), not a number; return a float")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise EnvCallError(f"{where} returned reward {value!r} ({type(value).__name__}), not a number") from e
    if not math.isfinite(v):
        raise EnvCallError(f"{where} returned a non-finite reward {v}; rewards must be finite numbers")
    return v


def coerce_step(out: Any, where: str) -> StepResult:
    """A step's return value (StepResult, 4-tuple or gymnasium's 5-tuple) as a checked StepResult."""
    if isinstance(out, StepResult):
        result = StepResult(out.observation, out.reward, out.done, out.info, out.truncated)
    elif isinstance(out, tuple) and len(out) == 4:
        result = StepResult(out[0], out[1], out[2], out[3])
    elif isinstance(out, tuple) and len(out) == 5:
        obs, reward, terminated, truncated, info = out
        result = StepResult(obs, reward, terminated, info, truncated)
    else:
        raise EnvCallError(f"{where} must return StepResult, (observation, reward, done, info) or (observation, "
                           f"reward, terminated, truncated, info), got {type(out).__name__}")
    result.reward = env_reward(result.reward, where)
    result.info = {} if result.info is None else result.info
    if not isinstance(result.info, dict):
        raise EnvCallError(f"{where} info must be a dict, got {type(result.info).__name__}")
    result.done, result.truncated = bool(result.done), bool(result.truncated)
    if result.observation is not None:
        try:
            as_messages(result.observation, where=f"{where} observation")
        except TypeError as e:
            raise EnvCallError(str(e)) from None
    return result


class EpisodeEnv:
    """One episode's environment, whatever its kind: every call timed and its result checked."""

    def __init__(self, user: Any, *, name: str, timeout_s: float) -> None:
        self.user, self.name, self.timeout_s = user, name, timeout_s
        self.kind = env_kind(type(user))

    def _call(self, method: str, *args, **kwargs) -> Any:
        return call_with_timeout(getattr(self.user, method), *args, timeout_s=self.timeout_s,
                                 what=f"environment {self.name}: {method}()", **kwargs)

    def reset(self, prompt: Prompt, seed: int) -> list[Message]:
        """The first observation as messages."""
        where = f"environment {self.name}: reset()"
        row = {"prompt": prompt.text, **prompt.meta}
        if self.kind == "trl":
            obs = self._call("reset", **row)
            if obs is not None and not isinstance(obs, str):
                raise EnvCallError(f"{where} must return a str or None (TRL's convention), got {type(obs).__name__}")
            obs = prompt.text + (obs or "")  # TRL appends the observation to the prompt's last message
        elif self.kind == "gymnasium":
            takes_options = any(p.name == "options" or p.kind is p.VAR_KEYWORD
                                for p in reset_params(self.user.reset))
            obs = self._call("reset", seed=seed, **({"options": row} if takes_options else {}))
        else:
            obs = self._call("reset", prompt, seed)
        if isinstance(obs, tuple) and len(obs) == 2 and isinstance(obs[1], dict):
            obs = obs[0]  # gymnasium's (observation, info)
        try:
            return as_messages(obs, where=f"{where} observation")
        except TypeError as e:
            raise EnvCallError(str(e)) from None

    def step(self, model_text: str) -> StepResult:
        """The environment's answer to a turn without tool calls (a TRL environment: the episode ends)."""
        if self.kind == "trl":
            return StepResult(None, 0.0, True)
        return coerce_step(self._call("step", model_text), f"environment {self.name}: step()")

    def tool_step(self, model_text: str, results: list[ToolResult]) -> StepResult | None:
        """What ``tool_step`` makes of a turn answered by tools (None: the environment has no tool_step)."""
        if not callable(getattr(self.user, "tool_step", None)):
            return None
        where = f"environment {self.name}: tool_step()"
        out = self._call("tool_step", model_text, results)
        if out is None:
            return StepResult(None)
        if isinstance(out, (StepResult, tuple)):
            return coerce_step(out, where)
        return StepResult(None, env_reward(out, where))

    def final_reward(self) -> float:
        """``get_reward()`` read at the episode's end (0 without one)."""
        if not callable(getattr(self.user, "get_reward", None)):
            return 0.0
        return env_reward(self._call("get_reward"), f"environment {self.name}: get_reward()")

    def call_tool(self, tool: Tool, arguments: dict[str, Any], max_chars: int) -> ToolResult:
        """A method tool on this episode's instance.  What it raises is its result (the model sees it);
        past the time limit the episode fails (:class:`EnvCallError`: the instance may still be changing)."""
        method = getattr(self.user, tool.name)
        result = call_with_timeout(call_to_result, tool.name, method, arguments, max_chars, timeout_s=self.timeout_s,
                                   what=f"environment {self.name}: tool {tool.name}()")
        result.arguments = dict(arguments)
        return result

