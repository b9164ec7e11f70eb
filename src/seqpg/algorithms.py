"""Algorithm families as data: which advantage estimator, policy loss and aggregation each uses.

Every family is a row of this table, not a branch in the trainer: the trainer asks the maths
core for ``compute_advantages(family.advantage, ...)`` and ``policy_loss(family.loss, ...)``.

| family        | advantage       | loss | aggregation (default)      | critic | epochs | paper                      |
|---------------|-----------------|------|----------------------------|--------|--------|----------------------------|
| a2c           | gae (λ)         | pg   | token-mean                 | yes    | 1      | Mnih et al. 2016           |
| ppo           | gae (λ)         | ppo  | token-mean                 | yes    | 2      | Schulman et al. 2017       |
| grpo          | grpo            | ppo  | seq-mean-token-mean        | no     | 1      | Shao et al. 2024           |
| dr_grpo       | dr_grpo         | ppo  | seq-mean-token-sum-norm    | no     | 1      | Liu et al. 2025            |
| rloo          | rloo            | pg   | token-mean                 | no     | 1      | Ahmadian et al. 2024       |
| reinforce     | reinforce       | pg   | token-mean                 | no     | 1      | Williams 1992              |
| reinforce_pp  | reinforce_pp    | ppo  | token-mean                 | no     | 1      | Hu 2025                    |
| remax         | remax           | pg   | token-mean                 | no     | 1      | Li et al. 2023             |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    advantage: str
    """Name in the core's advantage-estimator registry."""
    loss: str
    """Name in the core's policy-loss registry."""
    agg: str
    """Default loss aggregation."""
    critic: bool = False
    """Needs a learned value function (GAE)."""
    epochs: int = 1
    """Default passes over each batch."""
    greedy_baseline: bool = False
    """Needs the reward of a greedy completion per prompt (ReMax)."""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("a2c", "gae", "pg", "token-mean", critic=True),
    Family("ppo", "gae", "ppo", "token-mean", critic=True, epochs=2),
    Family("grpo", "grpo", "ppo", "seq-mean-token-mean"),
    Family("dr_grpo", "dr_grpo", "ppo", "seq-mean-token-sum-norm"),
    Family("rloo", "rloo", "pg", "token-mean"),
    Family("reinforce", "reinforce", "pg", "token-mean"),
    Family("reinforce_pp", "reinforce_pp", "ppo", "token-mean"),
    Family("remax", "remax", "pg", "token-mean", greedy_baseline=True),
)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]
