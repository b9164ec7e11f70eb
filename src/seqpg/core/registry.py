"""Registries keyed by name, every entry with one signature (the pattern of verl's ``core_algos``).

A :class:`Registry` holds the functions of one kind (advantage estimators, policy losses, KL
estimators). Registering checks the function's signature against the kind's one signature:
the same positional arguments, the same shared keyword-only arguments, and any further
parameters keyword-only. So a caller never special-cases an entry: it passes the shared
arguments plus the ``**params`` the entry declares, and :meth:`Registry.check_params` rejects
anything else by naming what the entry accepts.

Departure from verl: registering a second function under a taken name is always an error
(verl allows re-registering the same function), and an unknown name raises a ``ValueError``
that lists the valid names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

REQUIRED = inspect.Parameter.empty
"""The 'default' :meth:`Registry.params` reports for a parameter the caller must pass."""


class Registry:
    """Functions of one kind, by name.

    ``positional`` names the leading positional arguments every entry takes, ``shared`` the
    keyword-only arguments every entry takes; entries may add keyword-only ``params``.
    """

    def __init__(self, kind: str, positional: tuple[str, ...], shared: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.positional = positional
        self.shared = shared
        self._fns: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: file the function under ``name`` (a taken name or a wrong signature raises)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._fns[name].__qualname__})")
            self._check_signature(name, fn)
            self._fns[name] = fn
            return fn

        return decorator

    def _check_signature(self, name: str, fn: Callable[..., Any]) -> None:
        ps = list(inspect.signature(fn).parameters.values())
        head = [p.name for p in ps[: len(self.positional)]]
        kinds = {p.kind for p in ps[: len(self.positional)]}
        if head != list(self.positional) or not kinds <= {inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                          inspect.Parameter.POSITIONAL_ONLY}:
            raise TypeError(f"{self.kind} {name!r} must take positional arguments {self.positional}, got {head}")
        rest = ps[len(self.positional):]
        bad = [p.name for p in rest if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        if bad:
            raise TypeError(f"{self.kind} {name!r}: parameters after {self.positional} must be keyword-only: {bad}")
        missing = [s for s in self.shared if s not in {p.name for p in rest}]
        if missing:
            raise TypeError(f"{self.kind} {name!r} must accept the shared keyword arguments {self.shared}; "
                            f"missing {missing}")

    def get(self, name: str) -> Callable[..., Any]:
        """The function registered as ``name``; an unknown name raises a ValueError listing the valid ones."""
        if name not in self._fns:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._fns))}")
        return self._fns[name]

    __getitem__ = get

    def params(self, name: str) -> dict[str, Any]:
        """The entry's own keyword parameters: name -> default (``REQUIRED`` if it has none)."""
        sig = inspect.signature(self.get(name))
        skip = set(self.positional) | set(self.shared)
        return {p.name: p.default for p in sig.parameters.values() if p.name not in skip}

    def check_params(self, name: str, given: dict[str, Any]) -> None:
        """Raise if ``given`` holds a parameter the entry does not take, or lacks a required one."""
        accepted = self.params(name)
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            valid = ", ".join(accepted) or "none"
            raise ValueError(f"{self.kind} {name!r} got unknown parameter(s) {unknown}; it accepts: {valid}")
        missing = [k for k, d in accepted.items() if d is REQUIRED and k not in given]
        if missing:
            raise ValueError(f"{self.kind} {name!r} requires parameter(s) {missing}")

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self._fns)

    def __len__(self) -> int:
        return len(self._fns)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._fns)})"
