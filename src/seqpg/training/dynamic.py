"""Dynamic sampling (DAPO, Yu et al. 2025, section 3.2): spend the update on prompts that carry signal.

Under a group baseline a prompt whose samples all got the same reward has advantage 0 on every
token: it costs a full forward and backward and teaches nothing (it only dilutes the loss's
normaliser). With ``sampling.dynamic_sampling`` a step draws ``prompts_per_step`` prompts, samples
and scores them, keeps the groups whose rewards differ, and draws again until ``prompts_per_step``
such groups are kept or ``sampling.max_sample_rounds`` draws were made; groups beyond the batch are
discarded, as DAPO does.

Departure from DAPO: DAPO (verl) stops the run when the cap is reached; here the batch is filled with
the dropped groups instead, in the order drawn, so every step trains on exactly ``prompts_per_step``
groups (the update's mini-batches and a step's cost stay as configured) and a step whose draws were
all flat trains as it would have without dynamic sampling. ``dynamic/full`` says whether the cap cut
a step short. The draws advance the prompt stream and the random streams as any step does, so a
resumed run continues exactly.

Metrics: ``dynamic/rounds`` (draws made), ``dynamic/flat_drawn`` (fraction of drawn groups whose rewards
were all equal), ``dynamic/full`` (1: every group trained on has reward spread).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..batch import Prompt, RolloutBatch, ScoredBatch, sequence_returns
from .collapse import flat_groups
from .step import Scored, concat_rollouts


@dataclass
class Draw:
    """One draw of prompts, sampled and scored; ``rollout`` rows grouped by prompt in ``prompts`` order."""

    prompts: list[Prompt]
    rollout: RolloutBatch
    scored: Scored


def fill_batch(draw: Callable[[int], Draw], groups: int, max_rounds: int, pad_id: int) -> tuple[Draw, dict]:
    """Call ``draw(round)`` until ``groups`` groups with reward spread are collected or ``max_rounds`` draws
    were made; the batch of ``groups`` groups (spread first, then flat ones to fill) and the metrics.

    ``max_rounds`` 1 is a plain step: the first draw as it is, and no metrics.
    """
    if max_rounds < 1 or groups < 1:
        raise ValueError(f"fill_batch needs max_rounds >= 1 and groups >= 1, got {max_rounds}, {groups}")
    if max_rounds == 1:
        return draw(0), {}
    spread: list[tuple[Draw, torch.Tensor]] = []  # (draw, rows of one group)
    flat: list[tuple[Draw, torch.Tensor]] = []
    drawn = errors = rounds = 0
    while rounds < max_rounds and len(spread) < groups:
        d = draw(rounds)
        rounds += 1
        errors += d.scored.batch.num_scorer_errors
        ids_B = d.rollout.group_ids_B
        for g, is_flat in zip(torch.unique(ids_B).tolist(), flat_groups(sequence_returns(d.scored.batch), ids_B)):
            (flat if bool(is_flat) else spread).append((d, (ids_B == g).nonzero().squeeze(1)))
            drawn += 1
    chosen = spread[:groups] + flat[:max(0, groups - len(spread))]
    batch = _concat([_group(d, rows) for d, rows in chosen], pad_id, errors)
    return batch, {"dynamic/rounds": float(rounds), "dynamic/flat_drawn": len(flat) / max(drawn, 1),
                   "dynamic/full": float(len(spread) >= groups)}


def _group(d: Draw, rows: torch.Tensor) -> Draw:
    """The draw restricted to one group's ``rows``, its group id 0."""
    rollout = d.rollout.select(rows)
    rollout = replace(rollout, group_ids_B=torch.zeros_like(rollout.group_ids_B))
    s = d.scored.batch
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    batch = ScoredBatch(rollout, s.rewards_B[rows], {k: v[rows] for k, v in s.scores.items()},
                        pick(s.token_rewards_BC), pick(s.correct_B), 0, {k: v[rows] for k, v in s.applies.items()})
    return Draw([rollout.prompts[0]], rollout, Scored(batch, pick(d.scored.baseline_B)))


def _concat(parts: list[Draw], pad_id: int, errors: int) -> Draw:
    """One draw from single-group draws (group ids renumbered 0..G-1 in order)."""
    rollout = concat_rollouts([p.rollout for p in parts], pad_id)
    C = rollout.completion_ids_BC.shape[1]
    batches = [p.scored.batch for p in parts]
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    token_rewards_BC = None
    if batches[0].token_rewards_BC is not None:
        token_rewards_BC = torch.cat([F.pad(b.token_rewards_BC, (0, C - b.token_rewards_BC.shape[1]))
                                      for b in batches])
    batch = ScoredBatch(rollout, torch.cat([b.rewards_B for b in batches]),
                        {k: torch.cat([b.scores[k] for b in batches]) for k in batches[0].scores},
                        token_rewards_BC, cat([b.correct_B for b in batches]), errors,
                        {k: torch.cat([b.applies[k] for b in batches]) for k in batches[0].applies})
    return Draw([p.prompts[0] for p in parts], rollout, Scored(batch, cat([p.scored.baseline_B for p in parts])))
