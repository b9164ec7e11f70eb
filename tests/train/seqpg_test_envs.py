"""Small environments for end-to-end runs on the tiny model (importable as ``seqpg_test_envs:Class``)."""

from __future__ import annotations

import random


class EchoEnv:
    """Each turn is rewarded with its fraction of characters from the first half of the alphabet and
    answered with a short reply drawn from the environment's own RNG (seeded by reset), for ``turns``
    model turns."""

    def __init__(self, turns: int = 3):
        self.turns = turns

    def reset(self, prompt, seed):
        self.rng, self.k = random.Random(seed), 0
        return f"a {prompt.text}"

    def step(self, model_text):
        self.k += 1
        reward = sum(c in "abcdefghijklm" for c in model_text.lower()) / max(len(model_text), 1)
        done = self.k >= self.turns
        return (None if done else self.rng.choice(["more", "again", "go on"])), reward, done, {"k": self.k}


class NoStep:
    def reset(self, prompt, seed):
        return "hi"


def add(a: int, b: int) -> int:
    """Add.

    Args:
        a: x
        b: y
    """
    return a + b
