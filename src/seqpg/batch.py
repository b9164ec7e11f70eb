"""Typed containers for what flows between the training stages.

    sample  ->  RolloutBatch
    score   ->  ScoredBatch   (RolloutBatch + rewards)

Token layout (the same everywhere in the shell): every sequence is
``[prompt | completion]``.  Prompts are **left**-padded to a common length P, completions
are **right**-padded to a common length C, so that column ``P + t`` of the concatenation
holds completion token ``t`` of every row.  The maths core only ever sees the completion
part, shape ``(B, C)``; prompt and padding tokens therefore never reach a loss.

B counts *samples* (prompts x samples per prompt), not prompts.

Devices: the batches that flow between stages hold CPU tensors (the sampler returns them there,
scorers and advantage estimators work on them there; they are a few KB).  The functions that
run a model (``sampling.generate``, ``policy.completion_logprobs``, ``update.update``, the
reference policy and the critic) move what they need to the model's device themselves, so a
model on a GPU needs nothing else from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Prompt:
    """One prompt to sample from, with whatever its scorer needs to judge a completion."""

    text: str
    """The user's message (a chat template is applied by the sampler when configured)."""
    id: str
    """Stable identifier, unique within its source (used for splits, logging and resuming)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Task data for the scorer, e.g. a reasoning-gym entry with its answer."""


@dataclass
class RolloutBatch:
    """Sampled completions and the log-probabilities the sampler gave them.

    Row ``i`` is sample ``i``; ``prompts[i]`` is its prompt (repeated for n samples),
    ``group_ids_B[i]`` numbers the prompt within the batch (rows sharing a prompt share it).

    A batch of multi-turn episodes (:class:`seqpg.rollout.interface.Episodes`) fills the optional
    fields too: the environment's rewards, which turn each token belongs to, and the episodes
    themselves (their turns, tool results and environments); a batch of single-turn completions
    leaves them None.
    """

    prompts: list[Prompt]  # B
    completions: list[str]  # B, decoded completion text (stop strings removed)
    prompt_ids_BP: torch.Tensor  # (B, P) long, left-padded
    prompt_mask_BP: torch.Tensor  # (B, P) bool, True on real prompt tokens
    completion_ids_BC: torch.Tensor  # (B, C) long, right-padded
    completion_mask_BC: torch.Tensor  # (B, C) bool, True on the tokens trained on (the actions; EOS included)
    sample_logprobs_BC: torch.Tensor  # (B, C) float32, log pi_sample(token) at the sampling temperature, 0 on padding
    group_ids_B: torch.Tensor  # (B,) long
    finished_B: torch.Tensor  # (B,) bool, True when the sample stopped on EOS or a stop string (not truncated)
    env_rewards_BC: torch.Tensor | None = None  # (B, C) float32, episodes: each turn's environment reward on its last token
    turn_BC: torch.Tensor | None = None  # (B, C) long, episodes: k on model turn k's tokens, -1 on context and padding
    episodes: list[Any] | None = None  # B, episodes: each row's seqpg.rollout.episodes.Episode as sampled
    prefill_tokens: int | None = None  # prompt tokens the sampler ran through the model (rollout.prefix); None: not counted

    def __post_init__(self) -> None:
        B = len(self.prompts)
        for name in ("prompt_ids_BP", "prompt_mask_BP", "completion_ids_BC", "completion_mask_BC",
                     "sample_logprobs_BC"):
            t = getattr(self, name)
            if t.dim() != 2 or t.shape[0] != B:
                raise ValueError(f"RolloutBatch.{name} must have shape (B={B}, ·), got {tuple(t.shape)}")
        if self.prompt_ids_BP.shape != self.prompt_mask_BP.shape:
            raise ValueError("RolloutBatch: prompt_ids_BP and prompt_mask_BP shapes differ: "
                             f"{tuple(self.prompt_ids_BP.shape)} vs {tuple(self.prompt_mask_BP.shape)}")
        C = self.completion_ids_BC.shape
        if self.completion_mask_BC.shape != C or self.sample_logprobs_BC.shape != C:
            raise ValueError("RolloutBatch: completion_ids_BC, completion_mask_BC and sample_logprobs_BC "
                             f"must share one shape, got {tuple(C)}, {tuple(self.completion_mask_BC.shape)}, "
                             f"{tuple(self.sample_logprobs_BC.shape)}")
        if len(self.completions) != B or self.group_ids_B.shape != (B,) or self.finished_B.shape != (B,):
            raise ValueError(f"RolloutBatch: completions, group_ids_B and finished_B need length B={B}")
        for name in ("env_rewards_BC", "turn_BC"):
            t = getattr(self, name)
            if t is not None and t.shape != C:
                raise ValueError(f"RolloutBatch.{name} must have the completions' shape {tuple(C)}, got {tuple(t.shape)}")
        if self.episodes is not None and len(self.episodes) != B:
            raise ValueError(f"RolloutBatch: {len(self.episodes)} episodes for B={B} rows")

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def input_ids_BL(self) -> torch.Tensor:
        """(B, P + C) the full token rows, prompt then completion."""
        return torch.cat([self.prompt_ids_BP, self.completion_ids_BC], dim=1)

    @property
    def attention_mask_BL(self) -> torch.Tensor:
        """(B, P + C) True on every real token, prompt or completion (the context tokens inside a
        multi-turn episode's completion included: see :attr:`span_mask_BC`)."""
        return torch.cat([self.prompt_mask_BP, self.span_mask_BC], dim=1)

    @property
    def span_mask_BC(self) -> torch.Tensor:
        """(B, C) bool, True on every completion column up to the row's last action token.

        A single-turn completion's actions are a prefix of its row, and this is ``completion_mask_BC``.
        A multi-turn episode's completion holds the model's turns AND the environment's tokens between
        them (context: fed to the model, never trained on), so its action mask has holes; the span is
        what the model reads.  Tokens after the last action predict nothing that is trained on."""
        m_BC = self.completion_mask_BC
        return m_BC.flip(1).long().cumsum(dim=1).flip(1) > 0

    @property
    def completion_lengths_B(self) -> torch.Tensor:
        """(B,) the number of action tokens of each row (for single-turn rows, the completion's length)."""
        return self.completion_mask_BC.sum(dim=1)

    @property
    def span_lengths_B(self) -> torch.Tensor:
        """(B,) the number of completion columns up to each row's last action (:attr:`span_mask_BC`)."""
        return self.span_mask_BC.sum(dim=1)

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The batch with its tensors on ``device`` (itself when they are all there already)."""
        device = torch.device(device)
        names = ("prompt_ids_BP", "prompt_mask_BP", "completion_ids_BC", "completion_mask_BC", "sample_logprobs_BC",
                 "group_ids_B", "finished_B")
        if all(_on(getattr(self, n), device) for n in names):
            return self
        return RolloutBatch(prompts=self.prompts, completions=self.completions, env_rewards_BC=self.env_rewards_BC,
                            turn_BC=self.turn_BC, episodes=self.episodes, prefill_tokens=self.prefill_tokens,
                            **{n: getattr(self, n).to(device) for n in names})

    def select(self, rows: torch.Tensor | list[int]) -> "RolloutBatch":
        """The sub-batch of the given rows (for micro-batches and per-process shares; its ``prefill_tokens``
        not counted)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        il = idx.tolist()
        return RolloutBatch(
            prompts=[self.prompts[i] for i in il],
            completions=[self.completions[i] for i in il],
            prompt_ids_BP=self.prompt_ids_BP[idx],
            prompt_mask_BP=self.prompt_mask_BP[idx],
            completion_ids_BC=self.completion_ids_BC[idx],
            completion_mask_BC=self.completion_mask_BC[idx],
            sample_logprobs_BC=self.sample_logprobs_BC[idx],
            group_ids_B=self.group_ids_B[idx],
            finished_B=self.finished_B[idx],
            env_rewards_BC=None if self.env_rewards_BC is None else self.env_rewards_BC[idx],
            turn_BC=None if self.turn_BC is None else self.turn_BC[idx],
            episodes=None if self.episodes is None else [self.episodes[i] for i in il],
        )


def concat_rollouts(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One rollout from several, in order: prompts left-padded, completions right-padded to common widths,
    group ids renumbered so that the parts' groups stay distinct (episode fields concatenated too)."""
    P = max(r.prompt_ids_BP.shape[1] for r in parts)
    C = max(r.completion_ids_BC.shape[1] for r in parts)

    def cat(name: str, width: int, left: bool, fill) -> torch.Tensor | None:
        ts = [getattr(r, name) for r in parts]
        if any(t is None for t in ts):
            return None
        return torch.cat([F.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=fill)
                          for t in ts])

    offsets = torch.tensor([0] + [int(r.group_ids_B.max()) + 1 for r in parts[:-1]]).cumsum(0).tolist()
    episodes = [r.episodes for r in parts]
    prefill = [r.prefill_tokens for r in parts]
    return RolloutBatch(
        prompts=[p for r in parts for p in r.prompts], completions=[t for r in parts for t in r.completions],
        prompt_ids_BP=cat("prompt_ids_BP", P, True, pad_id), prompt_mask_BP=cat("prompt_mask_BP", P, True, False),
        completion_ids_BC=cat("completion_ids_BC", C, False, pad_id),
        completion_mask_BC=cat("completion_mask_BC", C, False, False),
        sample_logprobs_BC=cat("sample_logprobs_BC", C, False, 0.0),
        group_ids_B=torch.cat([r.group_ids_B + o for r, o in zip(parts, offsets)]),
        finished_B=torch.cat([r.finished_B for r in parts]),
        env_rewards_BC=cat("env_rewards_BC", C, False, 0.0), turn_BC=cat("turn_BC", C, False, -1),
        episodes=None if any(e is None for e in episodes) else [ep for e in episodes for ep in e],
        prefill_tokens=None if None in prefill else sum(prefill))


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` lives on ``device`` (``cuda`` without an index: the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return t.device == device


@dataclass
class ScoredBatch:
    """A rollout with its rewards: the weighted total and each scorer's own score."""

    rollout: RolloutBatch
    rewards_B: torch.Tensor  # (B,) float32, weighted sum of the scorers' sequence scores
    scores: dict[str, torch.Tensor]  # scorer name -> (B,) float32 raw (unweighted) score
    token_rewards_BC: torch.Tensor | None = None  # (B, C) dense per-token rewards (weighted), if any scorer gives them
    correct_B: torch.Tensor | None = None  # (B,) bool, where the task defines correctness (e.g. a verifier score of 1)
    num_scorer_errors: int = 0  # scores replaced by 0 after a scorer raised (only with on_error="zero")
    applies: dict[str, torch.Tensor] = field(default_factory=dict)
    """scorer name -> (B,) bool, False where the scorer returned None ("does not apply to this sample"); only
    for scorers that may return None (``Scorer.may_abstain``). Their ``scores`` hold 0 there, so that the
    weighted sum ``rewards_B`` leaves them out (TRL's ``nansum``)."""


def sequence_returns(scored: ScoredBatch) -> torch.Tensor:
    """(B,) each sample's whole reward: its sequence reward plus its dense per-token rewards summed (for a
    multi-turn episode, its return: the scorers on the final turn and the environment's rewards)."""
    dense_B = scored.token_rewards_BC.sum(dim=1) if scored.token_rewards_BC is not None else 0.0
    return scored.rewards_B + dense_B


def total_rewards(scored: ScoredBatch) -> torch.Tensor:
    """The reward the advantage estimator sees: (B,) sequence rewards, or (B, C) per-token rewards
    (sequence rewards on each row's last real token plus the dense scorers' rewards) when any
    scorer is dense."""
    if scored.token_rewards_BC is None:
        return scored.rewards_B
    from .core import to_token_rewards

    mask_BC = scored.rollout.completion_mask_BC
    return to_token_rewards(scored.rewards_B, mask_BC) + scored.token_rewards_BC
