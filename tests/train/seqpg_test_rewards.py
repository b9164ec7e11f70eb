"""Reward functions for the end-to-end tests, referenced as `module:function` from configs."""

TARGET = "a"


def target_fraction(prompt: str, completion: str, meta: dict) -> float:
    """Fraction of the completion's characters that are the target: the optimum is all `a`."""
    return completion.count(TARGET) / max(len(completion), 1) if completion else 0.0


def raises_on_b(prompt: str, completion: str, meta: dict) -> float:
    """Raises on prompts that contain `b`: a scorer that breaks on one sample."""
    if "b" in prompt:
        raise RuntimeError("this scorer cannot judge prompts with b")
    return 0.0


def trl_target_fraction(completions, **kwargs):
    """`target_fraction` written the TRL way (one call per batch). It also draws from Python's, NumPy's and
    torch's global random streams, as a sampling judge would, so that an evaluation that let it move them
    would change the training that follows."""
    import random

    import numpy as np
    import torch

    random.random(), np.random.rand(), torch.rand(1)
    return [completion.count(TARGET) / max(len(completion), 1) if completion else 0.0 for completion in completions]


def trl_target_fraction_or_none(completions, **kwargs):
    """`trl_target_fraction`, but None ("does not apply") for completions without the letter `e`."""
    return [None if "e" not in completion else completion.count(TARGET) / len(completion)
            for completion in completions]


def constant(prompt: str, completion: str, meta: dict) -> float:
    """The same reward for everything: no group has any spread (a collapsed run's signal)."""
    return 1.0


def vowel_count(prompt: str, completion: str, meta: dict) -> float:
    """Vowels in the completion: a reward that varies between a random model's samples."""
    return float(sum(completion.count(v) for v in "aeiou"))


def flat_before_n(prompt: str, completion: str, meta: dict) -> float:
    """0 for every completion of a prompt before `n` in the alphabet (a group without spread), else
    `target_fraction`: dynamic sampling must never train on the first kind while the second is at hand."""
    return 0.0 if prompt.strip()[:1] < "n" else target_fraction(prompt, completion, meta)


def zero(prompt: str, completion: str, meta: dict) -> float:
    """0 for everything: a sparse task that no sample solves yet (every group flat)."""
    return 0.0
