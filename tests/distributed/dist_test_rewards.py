"""Reward functions for the multi-process tests, referenced as `module:function` from configs."""

import os


def raises_on_rank_1(prompt: str, completion: str, meta: dict) -> float:
    """Raises in the process of rank 1 only: a scorer that breaks on one process of several."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("this scorer cannot run on rank 1")
    return completion.count("a") / max(len(completion), 1)


def char_code_mean(prompt: str, completion: str, meta: dict) -> float:
    """Mean character code of the completion (scaled to [0, 1]): differs between almost any two
    completions, so every group has non-zero advantages and every step moves the parameters."""
    return sum(map(ord, completion)) / (127 * len(completion)) if completion else 0.0
