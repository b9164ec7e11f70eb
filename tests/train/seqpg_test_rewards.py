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


def constant(prompt: str, completion: str, meta: dict) -> float:
    """The same reward for everything: no group has any spread (a collapsed run's signal)."""
    return 1.0


def vowel_count(prompt: str, completion: str, meta: dict) -> float:
    """Vowels in the completion: a reward that varies between a random model's samples."""
    return float(sum(completion.count(v) for v in "aeiou"))
