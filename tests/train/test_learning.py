"""Each algorithm family LEARNS on a tiny model whose optimum is known (emit the character `a`).

The reward is the fraction of `a` in a 6-token completion; a random 2-layer model starts near
1/101. A run counts as learning when the mean reward of its last steps is well above the
first steps' (by many standard errors of the per-step noise), not when parameters merely moved.
"""

from __future__ import annotations

import statistics

import pytest

from seqpg.config import load_config
from seqpg.runlog import read_jsonl
from seqpg.trainer import train

FAMILY_SETTINGS = {
    "grpo": [],
    "dr_grpo": [],
    "rloo": [],
    "reinforce": [],
    "reinforce_pp": [],
    "remax": [],
    "a2c": ["algo.lam=0.95", "algo.critic_lr=3e-2"],
    "ppo": ["algo.minibatches=2", "algo.critic=shared"],
}


@pytest.mark.parametrize("family", sorted(FAMILY_SETTINGS))
def test_family_learns_target_token(family, tiny_overrides):
    cfg = load_config(None, tiny_overrides(f"algo.name={family}", "steps=30", *FAMILY_SETTINGS[family]))
    result = train(cfg, progress=False)
    rewards = [m["reward_mean"] for m in read_jsonl(result.run_dir / "metrics.jsonl")]
    assert len(rewards) == 30
    first, last = rewards[:5], rewards[-5:]
    se = (statistics.pvariance(first) / 5 + statistics.pvariance(last) / 5) ** 0.5
    gain = statistics.mean(last) - statistics.mean(first)
    assert gain > 0.3 and gain > 6 * se, (family, rewards)
