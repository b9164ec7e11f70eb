"""Algorithm families as data: which advantage estimator, policy loss and aggregation each uses.

Every family is a row of this table, not a branch in the trainer: the step asks the maths core
for ``compute_advantages(advantage, ...)`` and ``policy_loss(loss, ...)`` by name.  What a family
needs (groups of samples per prompt, a learned critic, a greedy completion per prompt) is what its
advantage estimator needs, declared once in ``NEEDS``; the config may name an estimator or a loss
directly (``algo.advantage``, ``algo.loss``) and the needs follow the estimator.

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
class Needs:
    """What an advantage estimator needs from the step besides rewards and a mask."""

    groups: bool = False
    """Compares samples of the same prompt: ``sampling.samples_per_prompt`` must be 2 or more."""
    critic: bool = False
    """A learned value function V(s_t) (GAE)."""
    greedy_baseline: bool = False
    """The reward of one greedy completion per prompt (ReMax)."""


NEEDS: dict[str, Needs] = {
    "gae": Needs(critic=True),
    "grpo": Needs(groups=True),
    "dr_grpo": Needs(groups=True),
    "rloo": Needs(groups=True),
    "reinforce_baseline": Needs(groups=True),
    "remax": Needs(greedy_baseline=True),
}
"""Needs of the core's estimators by name; an estimator not listed (e.g. ``reinforce``, or one a user
registers) needs nothing more."""


def needs_of(advantage: str) -> Needs:
    """What the estimator named ``advantage`` needs (see ``NEEDS``)."""
    return NEEDS.get(advantage, Needs())


@dataclass(frozen=True)
class Family:
    name: str
    advantage: str
    """Name in the core's advantage-estimator registry."""
    loss: str
    """Name in the core's policy-loss registry."""
    agg: str
    """Default loss aggregation."""
    epochs: int = 1
    """Default passes over each batch."""

    @property
    def needs(self) -> Needs:
        return needs_of(self.advantage)

    @property
    def critic(self) -> bool:
        """Needs a learned value function (GAE)."""
        return self.needs.critic

    @property
    def greedy_baseline(self) -> bool:
        """Needs the reward of a greedy completion per prompt (ReMax)."""
        return self.needs.greedy_baseline


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` to ``FAMILIES``; a taken name is an error."""
    if family.name in FAMILIES:
        raise ValueError(f"algorithm family {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


for _f in (
    Family("a2c", "gae", "pg", "token-mean"),
    Family("ppo", "gae", "ppo", "token-mean", epochs=2),
    Family("grpo", "grpo", "ppo", "seq-mean-token-mean"),
    Family("dr_grpo", "dr_grpo", "ppo", "seq-mean-token-sum-norm"),
    Family("rloo", "rloo", "pg", "token-mean"),
    Family("reinforce", "reinforce", "pg", "token-mean"),
    Family("reinforce_pp", "reinforce_pp", "ppo", "token-mean"),
    Family("remax", "remax", "pg", "token-mean"),
):
    register_family(_f)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def resolve_family(name: str, advantage: str | None = None, loss: str | None = None) -> Family:
    """The family ``name`` with its estimator and/or loss replaced where the config names them."""
    f = get_family(name)
    if advantage is None and loss is None:
        return f
    return Family(f.name, advantage or f.advantage, loss or f.loss, f.agg, f.epochs)
