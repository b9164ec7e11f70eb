"""The rollout interface's shared parts: one seeder, one concatenation, episode fields carried by the batch."""

from __future__ import annotations

import hashlib

import torch

from seqpg.batch import Prompt, RolloutBatch, concat_rollouts
from seqpg.rollout.seeding import derive_seed, reset_seeds, seeded_generator


def batch(rows: int, C: int, groups: int, *, episodes: bool, tag: str) -> RolloutBatch:
    g = torch.Generator().manual_seed(rows * 10 + C)
    mask = torch.rand(rows, C, generator=g) > 0.3
    extra = {}
    if episodes:
        extra = dict(env_rewards_BC=torch.rand(rows, C, generator=g), episodes=[f"{tag}{i}" for i in range(rows)],
                     turn_BC=torch.randint(-1, 2, (rows, C), generator=g))
    return RolloutBatch(prompts=[Prompt(f"{tag}{i}", f"{tag}{i}") for i in range(rows)],
                        completions=[f"c{tag}{i}" for i in range(rows)],
                        prompt_ids_BP=torch.ones(rows, 2, dtype=torch.long),
                        prompt_mask_BP=torch.ones(rows, 2, dtype=torch.bool),
                        completion_ids_BC=torch.arange(rows * C).view(rows, C), completion_mask_BC=mask,
                        sample_logprobs_BC=-torch.rand(rows, C, generator=g),
                        group_ids_B=torch.arange(groups).repeat_interleave(rows // groups),
                        finished_B=torch.ones(rows, dtype=torch.bool), **extra)


def test_concat_pads_keeps_episode_fields_and_keeps_groups_apart():
    a, b = batch(4, 3, 2, episodes=True, tag="a"), batch(2, 5, 1, episodes=True, tag="b")
    r = concat_rollouts([a, b], pad_id=0)
    assert r.group_ids_B.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.episodes == ["a0", "a1", "a2", "a3", "b0", "b1"]
    assert r.env_rewards_BC.shape == (6, 5) and (r.env_rewards_BC[:4, 3:] == 0).all()
    assert (r.turn_BC[:4, 3:] == -1).all() and torch.equal(r.turn_BC[4:], b.turn_BC)
    torch.testing.assert_close(r.env_rewards_BC[:4, :3], a.env_rewards_BC)
    plain = concat_rollouts([batch(2, 3, 1, episodes=False, tag="c")] * 2, pad_id=0)
    assert plain.episodes is None and plain.env_rewards_BC is None and plain.group_ids_B.tolist() == [0, 0, 1, 1]


def test_select_and_to_carry_episode_fields():
    a = batch(4, 3, 2, episodes=True, tag="a")
    s = a.select([3, 1])
    assert s.episodes == ["a3", "a1"] and torch.equal(s.turn_BC, a.turn_BC[[3, 1]])
    torch.testing.assert_close(s.env_rewards_BC, a.env_rewards_BC[[3, 1]])
    assert a.to("cpu").episodes == a.episodes


def test_one_seeder_for_generators_and_environment_resets():
    """Reset seeds are the low 31 bits of the hash of (seed, step, "env", index): what resumed and
    multi-process runs reset their environments with must not change."""
    digest = hashlib.sha256(repr((7, 3, "env", 5)).encode()).digest()
    assert reset_seeds(7, 3, 4, 2)[1] == int.from_bytes(digest[:4], "little") & (2**31 - 1)
    assert derive_seed(7, 3, "env", 5, bits=31) == reset_seeds(7, 3, 5, 1)[0]
    a, b = seeded_generator("cpu", 1, 2, "prompt", 0), seeded_generator("cpu", 1, 2, "prompt", 0)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    assert not torch.equal(torch.rand(3, generator=seeded_generator("cpu", 1, 2, "prompt", 1)),
                           torch.rand(3, generator=seeded_generator("cpu", 1, 2, "prompt", 0)))
