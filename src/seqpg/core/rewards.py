"""Rewards: weighted sums of scorers, and where a sequence's reward is credited.

A scorer gives either one score per sequence, (B,), or one per token, (B, T). The total is

    R = sum_k w_k s_k                                                            (1)

with signed weights (e.g. {"helpful": 0.8, "harm": -0.2}). A sequence score is credited to the
sequence's LAST real token, the usual RLHF convention (Ziegler et al. 2019; Ouyang et al.
2022): with a per-token reward r_t, the return-to-go of every earlier token then includes it,

    r_t = s * 1[t = last real token of the row]                                   (2)

Non-finite scores are refused at the door, naming the scorer and the row: a NaN reward would
silently poison every advantage of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ._checks import check_finite, check_mask, check_no_empty_rows, check_tensor, float_dtype, last_token_index


def to_token_rewards(rewards: torch.Tensor, mask_BT: torch.Tensor, *, name: str = "rewards") -> torch.Tensor:
    """Per-token rewards (B, T), 0 on padding, eq. (2).

    ``rewards`` (B,): each score on its row's last real token (a row with no real token is an
    error: there is nowhere to credit it). ``rewards`` (B, T): kept on real tokens, zeroed on
    padding. Non-finite values (on real tokens) are an error naming the row.
    """
    mask = check_mask("mask", mask_BT)
    if not isinstance(rewards, torch.Tensor) or rewards.dim() not in (1, 2):
        got = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"{name} must have shape (B,) or (B, T), got {got}")
    B, T = mask.shape
    dt = float_dtype(rewards)
    if rewards.dim() == 1:
        if rewards.shape != (B,):
            raise ValueError(f"{name} of shape (B,) must have B = {B} rows like mask {tuple(mask.shape)}, "
                             f"got {tuple(rewards.shape)}")
        check_finite(name, rewards)
        check_no_empty_rows("mask", mask, f"a sequence reward in {name} needs a real token to be credited to")
        out_BT = torch.zeros((B, T), dtype=dt, device=rewards.device)
        out_BT[torch.arange(B, device=rewards.device), last_token_index(mask)] = rewards.to(dt)
        return out_BT
    if rewards.shape != mask.shape:
        raise ValueError(f"{name} of shape (B, T) must have the shape of mask {tuple(mask.shape)}, "
                         f"got {tuple(rewards.shape)}")
    check_finite(name, rewards, mask)
    return torch.where(mask, rewards.to(dt), 0)


@dataclass
class ScorerStats:
    """Statistics of one scorer's per-sequence scores (a dense scorer: its sum over real tokens)."""

    mean: float
    std: float
    """Population std (divides by B), defined for B = 1."""
    min: float
    max: float
    weight: float


@dataclass
class RewardStats:
    """Per-scorer statistics and those of the weighted total."""

    scorers: dict[str, ScorerStats]
    total: ScorerStats
    """Statistics of the per-sequence total (weight 1.0)."""

    def to_dict(self) -> dict[str, float]:
        """Flat ``{"<scorer>/<stat>": value}`` for logging, the total under ``"total/<stat>"``."""
        out: dict[str, float] = {}
        for name, st in [*self.scorers.items(), ("total", self.total)]:
            out.update({f"{name}/{k}": float(v) for k, v in vars(st).items()})
        return out


def _stats(per_seq_B: torch.Tensor, weight: float) -> ScorerStats:
    x = per_seq_B.double()
    return ScorerStats(mean=float(x.mean()), std=float(x.std(correction=0)), min=float(x.min()),
                       max=float(x.max()), weight=float(weight))


def combine_rewards(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float], *,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RewardStats]:
    """R = sum_k w_k s_k, eq. (1). Returns (total, RewardStats).

    All scores (B,): the total is (B,). All (B, T): the total is (B, T) (zeroed on padding when
    ``mask`` is given). Mixed: ``mask`` (B, T) is required, sequence scores go on each row's last
    real token, and the total is (B, T). ``weights`` must name exactly the scorers in ``scores``.
    NaN or inf anywhere in a score, or in a weight, is a ValueError naming the scorer and the row.
    """
    if not scores:
        raise ValueError("combine_rewards: scores is empty")
    missing, extra = sorted(set(scores) - set(weights)), sorted(set(weights) - set(scores))
    if missing or extra:
        raise ValueError(f"combine_rewards: weights must name exactly the scorers {sorted(scores)}; "
                         f"missing {missing}, without a score {extra}")
    B = None
    for name, s in scores.items():
        check_tensor(f"scores[{name!r}]", s)
        if s.dim() not in (1, 2):
            raise ValueError(f"scores[{name!r}] must have shape (B,) or (B, T), got {tuple(s.shape)}")
        if B is not None and s.shape[0] != B:
            raise ValueError(f"scores[{name!r}] has {s.shape[0]} rows, other scorers have {B} "
                             f"(shapes { {k: tuple(v.shape) for k, v in scores.items()} })")
        B = s.shape[0]
        check_finite(f"scores[{name!r}]", s)
        w = weights[name]
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights[{name!r}] must be a finite number, got {w!r}")
    dense = {n for n, s in scores.items() if s.dim() == 2}
    dense_shapes = {tuple(scores[n].shape) for n in dense}
    if len(dense_shapes) > 1:
        raise ValueError(f"dense scores must share one shape (B, T), got "
                         f"{ {n: tuple(scores[n].shape) for n in sorted(dense)} }")
    m = None
    if mask is not None:
        m = check_mask("mask", mask)
        if m.shape[0] != B:
            raise ValueError(f"mask must have B = {B} rows like the scores, got shape {tuple(m.shape)}")
    elif dense and len(dense) < len(scores):
        raise ValueError(f"combine_rewards: dense scorers {sorted(dense)} mixed with sequence scorers "
                         f"{sorted(set(scores) - dense)} need mask (B, T) to place the sequence scores")
    dt = float_dtype(*scores.values())
    per_token = bool(dense)
    total = None
    stats: dict[str, ScorerStats] = {}
    for name, s in scores.items():
        if per_token:
            s_BT = to_token_rewards(s, m, name=f"scores[{name!r}]") if m is not None else s.to(dt)
            term = weights[name] * s_BT
            per_seq = s_BT.sum(dim=1)
        else:
            term = weights[name] * s.to(dt)
            per_seq = s
        total = term if total is None else total + term
        stats[name] = _stats(per_seq, weights[name])
    total_B = total.sum(dim=1) if per_token else total
    return total, RewardStats(scorers=stats, total=_stats(total_B, 1.0))
