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

:class:`EpisodeBatch` lays episodes out right-padded as (B, L) tensors on the CPU, the shape
the core takes; :func:`episode_logprobs` is the trainer's log-prob of every action token from
one forward pass over whole episodes (column t from the logits at column t - 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seqpg.batch import Prompt
from seqpg.core.logprobs import token_logprobs_and_entropy
from seqpg.core import token_logprobs
from seqpg.model.policy import model_device

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
    """The episode's environment instance, as the user's class built it (what ``environments=`` rewards see)."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """The conversation the tokens hold: first observation, model turns, tool results and observations."""

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


@dataclass
class EpisodeBatch:
    """Episodes as right-padded (B, L) CPU tensors; column t holds token t of every episode."""

    episodes: list[Episode]
    ids_BL: torch.Tensor  # (B, L) long, pad after each episode
    attention_mask_BL: torch.Tensor  # (B, L) bool, True on every real token (context and actions)
    action_mask_BL: torch.Tensor  # (B, L) bool, True on model-written tokens only
    sample_logprobs_BL: torch.Tensor  # (B, L) float32, sampler log pi on actions, 0 elsewhere
    rewards_BL: torch.Tensor  # (B, L) float32, each turn's reward on its last token
    turn_BL: torch.Tensor  # (B, L) long, k on turn k's tokens, -1 off actions
    group_ids_B: torch.Tensor  # (B,) long, episodes from one initial prompt share an id
    done_B: torch.Tensor  # (B,) bool, the environment ended the episode
    truncated_B: torch.Tensor  # (B,) bool, cut at a turn limit or token budget

    @property
    def batch_size(self) -> int:
        return len(self.episodes)


def batch_episodes(episodes: list[Episode], pad_id: int) -> EpisodeBatch:
    """The padded tensors of ``episodes`` (each checked first)."""
    if not episodes:
        raise ValueError("batch_episodes: no episodes")
    for ep in episodes:
        ep.check()
    B, L = len(episodes), max(len(ep.token_ids) for ep in episodes)
    ids_BL = torch.full((B, L), pad_id, dtype=torch.long)
    real_BL = torch.zeros((B, L), dtype=torch.bool)
    action_BL = torch.zeros((B, L), dtype=torch.bool)
    lp_BL = torch.zeros((B, L), dtype=torch.float32)
    r_BL = torch.zeros((B, L), dtype=torch.float32)
    turn_BL = torch.full((B, L), -1, dtype=torch.long)
    for i, ep in enumerate(episodes):
        n = len(ep.token_ids)
        ids_BL[i, :n] = torch.tensor(ep.token_ids, dtype=torch.long)
        real_BL[i, :n] = True
        action_BL[i, :n] = torch.tensor(ep.action_mask, dtype=torch.bool)
        lp_BL[i, :n] = torch.tensor(ep.sample_logprobs, dtype=torch.float32)
        r_BL[i, :n] = torch.tensor(ep.token_rewards, dtype=torch.float32)
        for k, turn in enumerate(ep.turns):
            turn_BL[i, turn.start:turn.end] = k
    return EpisodeBatch(
        episodes=list(episodes), ids_BL=ids_BL, attention_mask_BL=real_BL, action_mask_BL=action_BL,
        sample_logprobs_BL=lp_BL, rewards_BL=r_BL, turn_BL=turn_BL,
        group_ids_B=torch.tensor([ep.group for ep in episodes], dtype=torch.long),
        done_B=torch.tensor([ep.done for ep in episodes]), truncated_B=torch.tensor([ep.truncated for ep in episodes]))


def episode_logprobs(model: nn.Module, batch: EpisodeBatch, *, temperature: float = 1.0,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs_BL, entropy_BL or None): log pi(x_t | x_<t) at ``temperature`` on action tokens, 0 elsewhere.

    One forward pass over the whole right-padded episodes (position ids 0 .. n-1, no padding inside);
    column t's log-prob is read from the logits at column t - 1 (an episode's first token is never
    an action).  Gradients flow when called outside ``torch.no_grad``; tensors on the model's device.
    """
    if temperature <= 0:
        raise ValueError(f"episode_logprobs: temperature must be > 0, got {temperature}")
    device = model_device(model)
    ids_BL, real_BL = batch.ids_BL.to(device), batch.attention_mask_BL.to(device)
    action_BL = batch.action_mask_BL.to(device)
    L = ids_BL.shape[1]
    pos_BL = torch.arange(L, device=device).expand_as(ids_BL) * real_BL
    logits_BLV = model(input_ids=ids_BL, attention_mask=real_BL.long(), position_ids=pos_BL, use_cache=False).logits
    if with_entropy:
        lp_BS, ent_BS = token_logprobs_and_entropy(logits_BLV[:, :-1], ids_BL[:, 1:], temperature)
    else:
        lp_BS, ent_BS = token_logprobs(logits_BLV[:, :-1], ids_BL[:, 1:], temperature), None
    zero_B1 = lp_BS.new_zeros((ids_BL.shape[0], 1))
    lp_BL = torch.cat([zero_B1, lp_BS], dim=1).masked_fill(~action_BL, 0.0)  # (B, L)
    ent_BL = torch.cat([zero_B1, ent_BS], dim=1).masked_fill(~action_BL, 0.0) if with_entropy else None
    return lp_BL, ent_BL
