"""Module names from before the stage packages (seqpg 0.1 layout), kept importable.

``import seqpg.trainer`` (or ``from seqpg.sampling import generate``) gives the module that now lives
at ``seqpg.training.trainer`` (``seqpg.rollout.sampling``): the same module object, so code and
monkeypatches written against the old names keep working.  New code should use the new names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED: dict[str, str] = {
    **{f"seqpg.{m}": f"seqpg.rollout.{m}" for m in ("sampling", "fastdecode", "cpu_caps")},
    "seqpg.models": "seqpg.model.loading",
    **{f"seqpg.{m}": f"seqpg.model.{m}" for m in ("policy", "segment_attention", "flops")},
    **{f"seqpg.{m}": f"seqpg.rewards.{m}" for m in ("scorers", "tasks")},
    **{f"seqpg.{m}": f"seqpg.training.{m}" for m in (
        "trainer", "update", "critic", "checkpoint", "distributed", "build", "memory", "runlog", "plots", "evaluate")},
    **{f"seqpg.{m}": f"seqpg.apps.{m}" for m in ("cli", "demo", "explain", "session")},
    "seqpg.apps.evaluate": "seqpg.training.evaluate",  # where it lived in 0.2
    "seqpg.bench": "seqpg.apps.bench",
}
"""Old module name -> new module name (a package's submodules follow it: ``seqpg.bench.report``)."""


def new_name(name: str) -> str | None:
    """Where the module once called ``name`` lives now (None: it did not move)."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        return importlib.util.spec_from_loader(fullname, self) if new_name(fullname) else None

    def create_module(self, spec):
        return importlib.import_module(new_name(spec.name))  # the module itself, under its old name too

    def exec_module(self, module) -> None:
        pass  # imported already, under its new name


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
