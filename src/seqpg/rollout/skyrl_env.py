"""SkyRL-Gym's text environments behind the ``episode.env`` line (optional extra ``seqpg[skyrl]``).

    episode:
      env: seqpg.rollout.skyrl_env:SkyRLEnv
      env_params: {id: gsm8k}                  # any id registered with skyrl_gym (gsm8k, gsm8k_multi_turn, aime, ...)

SkyRL-Gym builds one environment per sample from ``extras`` (the sample's ``reward_spec`` with its
``ground_truth``, and ``extra_info``), starts it with ``init(conversation) -> (conversation, metadata)``
and steps it with ``step(action) -> {"observations", "reward", "done", "metadata"}``.  Here each
episode's ``reset`` builds that environment from the prompt: the ground truth is the prompt's
``answer_column`` (``answer`` by default), every other column of the prompt goes to ``extra_info``,
and the prompt's text is the user's first message.  ``step`` maps SkyRL's output onto
:class:`~.environments.StepResult` (its ``observations`` are chat messages; none with ``done``).

Why SkyRL-Gym among the packages tried (docs/episodes.md): it installs in seconds with three small
dependencies and no server, its environments run in-process as plain Python classes, and its
step output is already a multi-turn, per-turn-reward shape.
"""

from __future__ import annotations

from typing import Any

from seqpg.batch import Prompt

from .environments import StepResult


class SkyRLEnv:
    """One SkyRL-Gym environment per episode, by registered ``id`` (see the module docstring)."""

    def __init__(self, id: str, env_config: dict[str, Any] | None = None, answer_column: str = "answer",
                 reward_method: str = "rule") -> None:
        try:
            import skyrl_gym
        except ImportError as e:
            raise ImportError("SkyRLEnv needs skyrl-gym: pip install 'seqpg[skyrl]'") from e
        known = sorted(skyrl_gym.envs.registration.registry)
        if id not in known:
            raise ValueError(f"SkyRLEnv: no skyrl_gym environment {id!r}; registered: {', '.join(known)}")
        self.id, self.env_config, self.answer_column, self.reward_method = id, env_config or {}, answer_column, \
            reward_method
        self.env: Any = None

    def reset(self, prompt: Prompt, seed: int) -> list[dict[str, Any]]:
        import skyrl_gym
        from omegaconf import OmegaConf

        if self.answer_column not in prompt.meta:
            raise KeyError(f"SkyRLEnv({self.id}): prompt {prompt.id!r} has no column {self.answer_column!r} (the "
                           "ground truth); set env_params.answer_column")
        extras = {"reward_spec": {"method": self.reward_method, "ground_truth": prompt.meta[self.answer_column]},
                  "extra_info": {k: v for k, v in prompt.meta.items() if k != self.answer_column}, "seed": seed}
        self.env = skyrl_gym.make(self.id, env_config=OmegaConf.create(self.env_config), extras=extras)
        conversation, _ = self.env.init([{"role": "user", "content": prompt.text}])
        return list(conversation)

    def step(self, model_text: str) -> StepResult:
        out = self.env.step(model_text)
        observations = list(out.get("observations") or [])
        done = bool(out["done"])
        return StepResult(observations if observations and not done else None, out["reward"], done,
                          dict(out.get("metadata") or {}))
