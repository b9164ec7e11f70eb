"""The multi-turn episode: its tokens, which of them are actions, and the rewards of its turns.

Layout.  An episode is ONE token sequence ``x_0 .. x_{L-1}``: the first observation (the prompt
rendered by the chat template), then model turns and environment deltas in turn.  Every token
is kept exactly as it was sampled or appended; nothing is ever decoded and re-tokenised.

    action_mask[t]     True only on tokens the model wrote (a turn's EOS included)
    sample_logprobs[t] log pi(x_t | x_<t) at the sampling temperature on actions, 0 elsewhere
    rewards[t]         turn k's reward on turn k's last token, 0 elsewhere

so with advantages A (computed with ``mask = action_mask``, which makes returns, GAE and
whitening skip the environment's tokens: "the next real token" is the model's next token, in this
turn or the next) the utility is the core's

    U = sum_t action_mask[t] log pi(x_t | x_<t) A_t = sum over model turns k of U_k.

The environment's tokens are in the context (they are attended to), never in U; the same
``action_mask`` is the mask of the KL term, the entropy bonus and the critic's targets.

:func:`episodes_to_rollout` lays episodes out as a :class:`~seqpg.batch.RolloutBatch` (the first
observation as the prompt, the rest as the completion), the one layout every stage of the step
takes; the trainer's log-probs of its action tokens are :func:`seqpg.model.policy.completion_logprobs`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..batch import Prompt, RolloutBatch
from .sampling import left_pad
from .tools import ToolResult


@dataclass
class Turn:
    """One model turn of an episode and what answered it."""

    start: int
    """Index in ``Episode.token_ids`` of the turn's first token."""
    end: int
    """One past its last token (``end - 1`` carries the turn's reward)."""
    text: str
    """What the model wrote, special tokens removed (what the environment or the tool parser read)."""
    reward: float = 0.0
    """The environment's reward for this turn (0 for a turn answered by tools)."""
    tool_results: list[ToolResult] = field(default_factory=list)
    """The tool calls of this turn, run (empty when the environment answered)."""
    info: dict[str, Any] = field(default_factory=dict)
    """The environment's ``info`` for this turn."""


@dataclass
class Episode:
    """A whole episode, as sampled: tokens, action mask, sampler log-probs, turns, how it ended."""

    prompt: Prompt
    group: int
    """Index of the prompt in the step: episodes from the same initial prompt share it (a group)."""
    seed: int
    """The seed its environment was reset with."""
    token_ids: list[int] = field(default_factory=list)
    action_mask: list[bool] = field(default_factory=list)
    sample_logprobs: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    prompt_len: int = 0
    """Tokens of the first observation (the rendered prompt)."""
    done: bool = False
    """The environment said done."""
    truncated: bool = False
    """Cut at the turn limit or the token budget before the environment said done."""
    env_error: str | None = None
    """Why the environment (or the chat template) failed in this episode, which was then closed as truncated
    (``episode.on_env_error: drop``); None when nothing failed."""
    env: Any = None
    """The environment instance the episode was played in."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """The conversation its tokens hold (system, user, assistant and tool messages)."""

    def append(self, ids: list[int], *, action: bool, logprobs: list[float] | None = None) -> None:
        """Extend the context with ``ids``: model tokens (``action``, with their log-probs) or environment ones."""
        self.token_ids.extend(ids)
        self.action_mask.extend([action] * len(ids))
        self.sample_logprobs.extend(logprobs if action else [0.0] * len(ids))

    @property
    def token_rewards(self) -> list[float]:
        """Per-token rewards: each turn's reward on its last token."""
        r = [0.0] * len(self.token_ids)
        for turn in self.turns:
            r[turn.end - 1] += turn.reward
        return r

    @property
    def total_reward(self) -> float:
        return sum(t.reward for t in self.turns)

    def check(self) -> None:
        """The per-token lists have one length, turns tile the action tokens exactly."""
        L = len(self.token_ids)
        if len(self.action_mask) != L or len(self.sample_logprobs) != L:
            raise ValueError(f"Episode {self.prompt.id!r}: token_ids, action_mask and sample_logprobs differ in length")
        covered = [False] * L
        for turn in self.turns:
            for t in range(turn.start, turn.end):
                covered[t] = True
        if covered != self.action_mask:
            raise ValueError(f"Episode {self.prompt.id!r}: the turns do not cover exactly the action tokens")


def episodes_to_rollout(episodes: list[Episode], pad_id: int, *, n: int,
                        prefill_tokens: int | None = None) -> RolloutBatch:
    """Episodes (``n`` per prompt, prompt-major) as one :class:`~seqpg.batch.RolloutBatch` (each checked first):

        prompt_ids_BP        the first observation (the rendered initial prompt), left-padded
        completion_ids_BC    everything after it, in order: model turns AND environment tokens, exactly the
                             ids sampled or appended, right-padded
        completion_mask_BC   the action mask: True only on the tokens the model wrote
        sample_logprobs_BC   the sampler's log-probs at the actions, 0 elsewhere
        env_rewards_BC       each turn's reward on its last token
        turn_BC              k on model turn k's tokens, -1 elsewhere
        group_ids_B          episodes of the same initial prompt share an id
        episodes             the episodes themselves
        prefill_tokens       as given: the first inputs' tokens the sampler ran through the model
    """
    if not episodes or len(episodes) % n:
        raise ValueError(f"episodes_to_rollout: {len(episodes)} episodes is not a whole number of groups of {n}")
    for ep in episodes:
        ep.check()
    prompt_ids_BP, prompt_mask_BP = left_pad([ep.token_ids[:ep.prompt_len] for ep in episodes], pad_id)
    B = len(episodes)
    C = max(len(ep.token_ids) - ep.prompt_len for ep in episodes)
    ids_BC = torch.full((B, C), pad_id, dtype=torch.long)
    action_BC = torch.zeros((B, C), dtype=torch.bool)
    lp_BC = torch.zeros((B, C), dtype=torch.float32)
    r_BC = torch.zeros((B, C), dtype=torch.float32)
    turn_BC = torch.full((B, C), -1, dtype=torch.long)
    for i, ep in enumerate(episodes):
        p, c = ep.prompt_len, len(ep.token_ids) - ep.prompt_len
        if ep.action_mask[:p] != [False] * p:
            raise ValueError(f"episodes_to_rollout: episode of prompt {ep.prompt.id!r} has actions in its prompt")
        ids_BC[i, :c] = torch.tensor(ep.token_ids[p:], dtype=torch.long)
        action_BC[i, :c] = torch.tensor(ep.action_mask[p:], dtype=torch.bool)
        lp_BC[i, :c] = torch.tensor(ep.sample_logprobs[p:], dtype=torch.float32)
        r_BC[i, :c] = torch.tensor(ep.token_rewards[p:], dtype=torch.float32)
        for k, turn in enumerate(ep.turns):
            turn_BC[i, turn.start - p:turn.end - p] = k
    return RolloutBatch(
        prompts=[ep.prompt for ep in episodes], completions=[ep.turns[-1].text for ep in episodes],
        prompt_ids_BP=prompt_ids_BP.cpu(), prompt_mask_BP=prompt_mask_BP.cpu(), completion_ids_BC=ids_BC,
        completion_mask_BC=action_BC, sample_logprobs_BC=lp_BC,
        group_ids_B=torch.arange(B // n).repeat_interleave(n), finished_B=torch.tensor([ep.done for ep in episodes]),
        env_rewards_BC=r_BC, turn_BC=turn_BC, episodes=list(episodes), prefill_tokens=prefill_tokens)
