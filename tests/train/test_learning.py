"""Each algorithm family LEARNS on a tiny model whose optimum is known (emit the character `a`).

The reward is the fraction of `a` in a 6-token completion; a random 2-layer model starts near
1/101. A run counts as learning when the mean reward of its last steps is well above the
first steps' (by many standard errors of the per-step noise), not when parameters merely moved.
"""

from __future__ import annotations

import statistics

import pytest

from seqpg.config import load_config
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train

FAMILY_SETTINGS = {
    "grpo": [],
    "dr_grpo": [],
    "rloo": [],
    "reinforce": [],
    "reinforce_pp": [],
    "remax": ["algo.whiten=true"],
    # whitened advantages: at this high learning rate, raw GAE advantages let the policy collapse away
    # from `a` in ~5 of 16 seeds (measured over seeds 0-15); whitened, 10 of 10 seeds learn.
    "a2c": ["algo.lam=0.95", "algo.critic_lr=3e-2", "algo.whiten=true"],
    "ppo": ["algo.minibatches=2", "algo.critic=shared", "algo.whiten=true", "optim.lr=1e-2"],
}
# At this scale (the target has probability ~1/101, 96 sampled tokens per step) a run can drift away
# from `a` before it ever samples enough of them. Measured over seeds 0-7 (final reward of 5 steps):
# grpo, dr_grpo, rloo, reinforce_pp, remax reach > 0.85 in 8/8; reinforce in 7/8 (one at 0.50);
# ppo in 7/8 (seed 6 stays at 0.02); a2c in 10/10 of seeds 0-9. A family passes when one of two
# seeded runs learns; a broken estimator or loss fails both.
SEEDS = (0, 1)


@pytest.mark.parametrize("family", sorted(FAMILY_SETTINGS))
def test_family_learns_target_token(family, tiny_overrides):
    runs = []
    for seed in SEEDS:
        cfg = load_config(None, tiny_overrides(f"algo.name={family}", "steps=30", f"seed={seed}",
                                               *FAMILY_SETTINGS[family], run=f"seed{seed}"))
        rewards = [m["reward_mean"] for m in read_jsonl(train(cfg, progress=False).run_dir / "metrics.jsonl")]
        assert len(rewards) == 30
        first, last = rewards[:5], rewards[-5:]
        se = (statistics.pvariance(first) / 5 + statistics.pvariance(last) / 5) ** 0.5
        gain = statistics.mean(last) - statistics.mean(first)
        if gain > 0.3 and gain > 6 * se:
            return
        runs.append((seed, round(gain, 3), [round(r, 3) for r in rewards]))
    pytest.fail(f"{family} did not learn with any of seeds {SEEDS}: {runs}")
