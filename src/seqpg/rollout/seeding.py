"""One seeder: every random stream of a rollout (the sampler's generator, an environment's reset seed)
comes from a sha256 hash of a key, so distinct keys give independent streams and the same key the same
stream in any process, after any resume."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*key, bits: int = 63) -> int:
    """A non-negative ``bits``-bit integer from a hash of ``key`` (63: a generator's seed; 31: an
    environment's reset seed)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**bits - 1)


def seeded_generator(device: torch.device | str, *key) -> torch.Generator:
    """A generator on ``device`` seeded by :func:`derive_seed` of ``key``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*key))


def reset_seeds(seed: int, step: int, first: int, count: int) -> list[int]:
    """The reset seeds of the environments of prompts ``first .. first + count - 1`` (their indices in the
    step's global batch) at ``step`` (-1: held-out evaluation); a completion ignores them."""
    return [derive_seed(seed, step, "env", first + i, bits=31) for i in range(count)]
