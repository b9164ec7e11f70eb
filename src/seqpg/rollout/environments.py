"""Environments for multi-turn episodes: the protocol, its step result, the loader, the limits.

An environment is a small Python class with a gymnasium / OpenEnv-like shape, one instance per
episode:

    reset(prompt, seed) -> first observation          (a str: the user's message; or chat messages)
    step(model_text)    -> (observation | None, reward, done, info)

``prompt`` is the :class:`seqpg.batch.Prompt` the episode starts from (its ``meta`` holds task
data), ``model_text`` the text of the model's last turn (special tokens removed).  An observation
is a str (a user message), one chat message ``{"role": ..., "content": ...}`` or a list of them;
None (allowed with ``done``) adds nothing.  ``step`` may return a :class:`StepResult` or the
4-tuple.  An episode ends when the environment says done, or is cut (``truncated``) at a turn
limit or a token budget (:class:`EpisodeLimits`).

Gymnasium's ``reset -> (obs, info)`` and 5-tuple ``step``, TRL's ``environment_factory`` classes and
an environment's own methods as tools are accepted too: :mod:`.env_adapters`.

The class is named in config as ``"module:Class"`` or ``"path/to/file.py:Class"``;
:func:`load_environment` checks it before any model loads and fails in one line naming what is
wrong.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from seqpg.batch import Prompt

Message = dict[str, Any]
"""One chat message: ``{"role": "user" | "tool" | "system" | ..., "content": str, ...}``."""

Observation = str | Message | list[Message]


@runtime_checkable
class Environment(Protocol):
    """What the multi-turn sampler calls; one instance per episode."""

    def reset(self, prompt: Prompt, seed: int) -> Observation:
        """Start an episode from ``prompt``; return the first observation (the model's first input)."""

    def step(self, model_text: str) -> "StepResult | tuple[Observation | None, float, bool, dict]":
        """React to the model's turn: (next observation or None, reward, done, info)."""


@dataclass
class StepResult:
    """What the environment answers to one model turn."""

    observation: Observation | None
    """Appended to the context before the model's next turn (None: nothing; only sensible with done)."""
    reward: float = 0.0
    """Reward for the turn just written; credited to its last token."""
    done: bool = False
    """The episode is over (terminal): the model writes no more."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything to log (kept per turn in the episode)."""
    truncated: bool = False
    """The environment cut the episode short (gymnasium's ``truncated``): it ends, not as a terminal state."""


ENV_SCORE = "env"
"""The name of the environment's rewards among a run's scores and in its logs (``reward/env``)."""


class QuestionEnv:
    """The environment of a tools-only run (``episode.tools`` without ``episode.env``): the task's prompt is
    the question; the first model turn without a tool call is the answer and ends the episode (reward 0:
    the scorers judge the answer)."""

    def reset(self, prompt, seed: int) -> str:
        return prompt.text

    def step(self, model_text: str):
        return None, 0.0, True, {}


@dataclass(frozen=True)
class EpisodeLimits:
    """When an episode is cut short (``truncated``) although its environment is not done."""

    max_turns: int
    """Model turns per episode."""
    max_new_tokens: int
    """Tokens the model may write in one turn (a turn cut here still goes to the environment)."""
    max_tokens: int
    """Token budget of the whole context: prompt, every model turn and every observation."""

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_new_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EpisodeLimits.{name} must be >= 1, got {getattr(self, name)}")

    def turn_budget(self, context_tokens: int) -> int:
        """How many tokens the next model turn may write, given the context's length so far (may be 0)."""
        return max(0, min(self.max_new_tokens, self.max_tokens - context_tokens))

    def truncated(self, *, turns: int, context_tokens: int) -> bool:
        """Whether an episode that is not done must stop: no turn left, or no room for a token."""
        return turns >= self.max_turns or context_tokens >= self.max_tokens


def as_messages(obs: Observation, *, where: str, role: str = "user") -> list[Message]:
    """An observation as chat messages: a str becomes one ``role`` message; messages are checked."""
    if isinstance(obs, str):
        return [{"role": role, "content": obs}]
    msgs = [obs] if isinstance(obs, dict) else obs
    if not isinstance(msgs, list) or not msgs:
        raise TypeError(f"{where} must be a str, a message dict or a non-empty list of them, got {type(obs).__name__}")
    for m in msgs:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TypeError(f"{where}: each message needs str 'role' and 'content', got {m!r:.120}")
    return list(msgs)


def load_environment(spec: str) -> type:
    """The environment class named by ``"module:Class"`` or ``"path/to/file.py:Class"``, checked.

    Errors (one line each, naming ``spec``): malformed spec, missing module or file, missing
    attribute, not a class, a class that follows none of the conventions of :mod:`.env_adapters`
    (no ``reset``; no ``step`` and a ``reset`` that does not take TRL's ``**row``).
    """
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rpartition(":")[2]:
        raise ValueError(f"environment {spec!r}: expected 'module:Class' or 'path/to/file.py:Class'")
    target, _, name = spec.rpartition(":")
    module = import_target(target, what=f"environment {spec!r}")
    if not hasattr(module, name):
        raise AttributeError(f"environment {spec!r}: {target!r} has no attribute {name!r}")
    cls = getattr(module, name)
    if not inspect.isclass(cls):
        raise TypeError(f"environment {spec!r}: {name!r} is a {type(cls).__name__}, not a class")
    try:
        env_kind(cls)
    except TypeError as e:
        raise TypeError(f"environment {spec!r}: {e}") from None
    return cls


def make_environment(cls: type, params: dict[str, Any] | None = None, *, spec: str = "") -> Any:
    """One instance of ``cls`` built with ``params``; a constructor that refuses them is named in the error."""
    try:
        return cls(**(params or {}))
    except TypeError as e:
        raise TypeError(f"environment {spec or cls.__name__}: cannot build it with params {params or {}}: {e}") from e


def import_target(target: str, *, what: str):
    """The module ``target`` names: a dotted module path or a ``.py`` file (loaded under its stem).

    A file's module is in ``sys.modules`` while it runs, as an imported one is (``@dataclass`` under
    ``from __future__ import annotations`` looks it up there).  Whatever importing raises is an
    ImportError naming ``what`` and the target."""
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise FileNotFoundError(f"{what}: no file {target!r}")
        mod_name = "seqpg_user_" + os.path.splitext(os.path.basename(target))[0]
        spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(spec)
        previous = sys.modules.get(mod_name)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:
            if previous is None:
                sys.modules.pop(mod_name, None)
            else:
                sys.modules[mod_name] = previous
            raise ImportError(f"{what}: importing {target!r} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ImportError(f"{what}: cannot import module {target!r}: {e}") from e
    except (Exception, SystemExit) as e:
        raise ImportError(f"{what}: importing module {target!r} failed: {type(e).__name__}: {e}") from e


ENV_KINDS = ("seqpg", "gymnasium", "trl")
"""The conventions an environment class may follow (:mod:`.env_adapters`)."""


def env_kind(cls: type) -> str:
    """Which convention ``cls`` follows (seqpg, gymnasium or TRL: :mod:`.env_adapters`); a class that follows
    none is a TypeError naming what is missing."""
    return _kind(cls)


@functools.lru_cache(maxsize=None)
def _kind(cls: type) -> str:
    reset = getattr(cls, "reset", None)
    if not callable(reset):
        raise TypeError(f"class {cls.__name__} lacks reset() (an environment needs reset(prompt, seed) and "
                        "step(model_text), or TRL's reset(**row) and tool methods)")
    params = reset_params(reset)
    if not callable(getattr(cls, "step", None)):
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return "trl"
        raise TypeError(f"class {cls.__name__} lacks step() and its reset does not take **kwargs (an environment "
                        "needs reset(prompt, seed) and step(model_text); a class without step() is a TRL "
                        "environment_factory class, whose reset(**row) takes the task's columns)")
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if named and (named[0].name == "seed" or named[0].kind is inspect.Parameter.KEYWORD_ONLY):
        return "gymnasium"
    return "seqpg"


def reset_params(fn) -> list[inspect.Parameter]:
    """``fn``'s parameters after ``self`` (none where its signature cannot be read)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    return params[1:] if params and params[0].name == "self" else params
