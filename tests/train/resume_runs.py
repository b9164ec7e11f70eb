"""The same tiny-model run uninterrupted and stopped-then-resumed, for the tests that compare the two."""

from __future__ import annotations

from seqpg.config import load_config
from seqpg.training.trainer import train

TIMING = ("time/", "tokens_per_s", "wall_time")
"""Metric keys that measure time, not maths: left out where runs are compared."""


def maths(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without their timing keys."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def full_and_resumed(overrides, *extra: str, stop_at: int):
    """(uninterrupted, resumed) training results: ``overrides(*extra, run=...)`` (a ``tiny_overrides``-like
    builder) run whole as run "full", and as run "half" stopped after ``stop_at`` steps (checkpointed
    there) then resumed to the end."""
    full = train(load_config(None, overrides(*extra, run="full")), progress=False)
    half = load_config(None, overrides(*extra, f"save_every={stop_at}", run="half"))
    half.steps = stop_at
    train(half, progress=False)
    resumed = train(load_config(None, overrides(*extra, f"save_every={stop_at}", run="half")), resume=True,
                    progress=False)
    return full, resumed
