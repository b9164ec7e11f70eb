"""Advantage estimators: A_t for every real token, from rewards, groups of samples, or values.

Rewards come per sequence, (B,), credited to the last real token, or per token, (B, T)
(:func:`seqpg.core.rewards.to_token_rewards`). Every estimator except ``gae`` works on the
discounted return-to-go over real tokens (padding is skipped, so holes in the mask are fine)

    G_t = r_t + gamma * G_{t'}    (t' the next real token; G = 0 past the last one)       (1)

and subtracts a baseline b_i computed from the sequence returns G_{i,0} (G at the first real
token), so with one sequence reward R_i and gamma = 1 every real token gets A_{i,t} = R_i - b_i.

===================  =======================================================  =====================
name                 A_{i,t}                                                  bias (gamma = 1)
===================  =======================================================  =====================
reinforce            G_t  (Williams 1992)                                     unbiased
reinforce_baseline   G_t - mean_j G_{j,0} over the global batch               E = (1 - 1/B) grad J
rloo                 G_t - mean_{j in g, j != i} G_{j,0}  (Kool et al. 2019;  unbiased
                     Ahmadian et al. 2024); sequence reward: n/(n-1) (R_i - mean_g R)
grpo                 (G_t - mean_g G_{j,0}) / (max(std_g, min_std) + eps)     biased (std of sample)
                     (Shao et al. 2024, DeepSeekMath)
dr_grpo              G_t - mean_g G_{j,0}  (Liu et al. 2025, Dr. GRPO)        E = (1 - 1/n) grad J
reinforce_pp         whiten(G_t) over the global batch's real tokens          biased
                     (Hu 2025, REINFORCE++)
remax                G_t - baseline_i, baseline = the greedy sample's reward  unbiased
                     (Li et al. 2024, ReMax)
gae                  sum_l (gamma lam)^l delta_{t+l},                          unbiased for lam = 1;
                     delta_t = r_t + gamma V_{t+1} - V_t (Schulman 2016)      lam < 1 iff V = V^pi
===================  =======================================================  =====================

A baseline keeps the estimator unbiased when it is independent of the sample it is subtracted
from: ``rloo`` (the others in the group), ``remax`` (a greedy sample, a function of the
parameters only) and ``gae`` values that depend only on the prefix y_<t. The batch mean of
``reinforce_baseline`` and the group mean of ``dr_grpo`` contain the sample itself with weight
1/B (1/n), which shrinks the expected gradient by exactly that factor (B is the global batch
size, or n the group size, of iid samples per prompt).

GRPO's std is the unbiased (Bessel) std of the group's sequence returns, as TRL and verl
compute it. A group of one sample (std undefined) and a group whose returns are all equal
(std 0) both get A = 0 on every token, never NaN (group means are computed as
min + mean(x - min), so equal returns centre to exactly 0).

GAE: the value after a row's last real token is 0 (terminal), also for sequences truncated at
the length limit. To bootstrap a truncated row instead, add gamma * V(s_T) to its last real
token's reward: delta_last = r + gamma V(s_T) - V_last, the same thing. returns = A + V.

Departures: advantages are RAW (verl whitens GAE inside the estimator; here whitening is the
explicit :func:`seqpg.core.masked.whiten`); statistics over the batch (``reinforce_baseline``,
``reinforce_pp``) go through ``all_reduce`` so data-parallel processes share global statistics;
group estimators need none (a group never spans processes). Rows with no real token are an
error. Advantages carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._checks import (check_finite, check_mask, check_no_empty_rows, check_rank, check_same_shape, check_unit,
                      first_token_index, float_dtype)
from .masked import AllReduce, reduce_sum, whiten
from .registry import Registry
from .rewards import to_token_rewards

ADVANTAGE_ESTIMATORS = Registry("advantage estimator", positional=("rewards_BT", "mask_BT"),
                                shared=("group_ids_B", "values_BT", "all_reduce"))
"""name -> fn(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, **params) -> (adv_BT, returns_BT)."""


def register_advantage(name: str) -> Callable:
    """Decorator: register an advantage estimator under ``name`` (a taken name raises)."""
    return ADVANTAGE_ESTIMATORS.register(name)


def advantage_params(name: str) -> dict:
    """The estimator's own parameters, name -> default (``registry.REQUIRED`` if none)."""
    return ADVANTAGE_ESTIMATORS.params(name)


def returns_to_go(rewards_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma G_{next real token}, eq. (1); 0 on padding. (B, T), (B, T) -> (B, T)."""
    check_unit("gamma", gamma)
    mask = check_mask("mask_BT", mask_BT)
    check_same_shape("rewards_BT", rewards_BT, "mask_BT", mask)
    r_BT = torch.where(mask, rewards_BT, 0)
    if gamma == 1.0:
        return torch.where(mask, r_BT.flip(1).cumsum(1).flip(1), 0)
    G_BT = torch.zeros_like(r_BT)
    nxt_B = torch.zeros_like(r_BT[:, 0])  # G of the next real token
    for t in reversed(range(r_BT.shape[1])):
        nxt_B = torch.where(mask[:, t], r_BT[:, t] + gamma * nxt_B, nxt_B)
        G_BT[:, t] = torch.where(mask[:, t], nxt_B, 0)
    return G_BT


def _seq_returns(G_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(B,) G at each row's first real token: the sequence's (discounted) return."""
    return G_BT.gather(1, first_token_index(mask_BT)[:, None]).squeeze(1)


def _groups(estimator: str, group_ids_B: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_G, inverse_B, counts_G) of the groups; a missing ``group_ids`` is an error."""
    if group_ids_B is None:
        raise ValueError(f"advantage estimator {estimator!r} needs group_ids (B,) (rows sharing a prompt)")
    return torch.unique(group_ids_B, return_inverse=True, return_counts=True)


def _group_mean(x_B: torch.Tensor, inv_B: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """(G,) mean of x over each group's rows, as min + mean(x - min): exact when a group's values are equal."""
    zeros_G = torch.zeros(counts_G.shape, dtype=x_B.dtype, device=x_B.device)
    min_G = zeros_G.scatter_reduce(0, inv_B, x_B, "amin", include_self=False)
    return min_G + zeros_G.index_add(0, inv_B, x_B - min_G[inv_B]) / counts_G


def _centred(G_BT, mask_BT, b_B):
    """A_t = G_t - b_i on real tokens, 0 on padding."""
    return torch.where(mask_BT, G_BT - b_B[:, None], 0)


@register_advantage("reinforce")
def reinforce(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, gamma: float = 1.0):
    """A_t = G_t (Williams 1992): the return-to-go, no baseline."""
    G_BT = returns_to_go(rewards_BT, mask_BT, gamma)
    return G_BT, G_BT


@register_advantage("reinforce_baseline")
def reinforce_baseline(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, gamma: float = 1.0):
    """A_t = G_t - b, b = mean of the sequence returns G_{j,0} over the global batch (through all_reduce).

    b includes the sample itself: E[grad] = (1 - 1/B) grad J for B iid samples per prompt.
    """
    G_BT = returns_to_go(rewards_BT, mask_BT, gamma)
    G0_B = _seq_returns(G_BT, mask_BT)
    stats = reduce_sum(torch.stack([G0_B.double().sum(), torch.tensor(float(G0_B.numel()), dtype=torch.float64,
                                                                       device=G0_B.device)]), all_reduce)
    b = (stats[0] / stats[1]).to(G_BT.dtype)
    return _centred(G_BT, mask_BT, b.expand_as(G0_B)), G_BT


@register_advantage("rloo")
def rloo(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, gamma: float = 1.0):
    """A_t = G_t - (sum_{j in g} G_{j,0} - G_{i,0}) / (n_g - 1): leave-one-out baseline (Kool et al. 2019)."""
    ids_G, inv_B, counts_G = _groups("rloo", group_ids_B)
    if (counts_G < 2).any():
        lone = ids_G[counts_G < 2].tolist()
        raise ValueError(f"rloo needs at least 2 samples per group; groups with one sample: {lone[:10]}")
    G_BT = returns_to_go(rewards_BT, mask_BT, gamma)
    G0_B = _seq_returns(G_BT, mask_BT)
    n_B = counts_G[inv_B].to(G0_B.dtype)
    sum_B = (_group_mean(G0_B, inv_B, counts_G) * counts_G)[inv_B]
    return _centred(G_BT, mask_BT, (sum_B - G0_B) / (n_B - 1)), G_BT


@register_advantage("grpo")
def grpo(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, gamma: float = 1.0,
         scale_by_std: bool = True, eps: float = 1e-6, min_std: float = 1e-3):
    """A_t = (G_t - mean_g) / (max(std_g, min_std) + eps) (Shao et al. 2024), std unbiased.

    A group of one sample, or whose sequence returns are all equal (std 0), gets A = 0 on every token.
    ``min_std`` keeps a group whose returns differ only by rounding (a reward model scoring the same text
    at two paddings) from being scaled up to unit advantages: |A| <= |G - mean_g| / min_std.

    ``scale_by_std=False``: A_t = G_t - mean_g (= ``dr_grpo``).
    """
    if not (isinstance(min_std, (int, float)) and 0 <= min_std < float("inf")):
        raise ValueError(f"grpo: min_std must be a finite number >= 0, got {min_std!r}")
    ids_G, inv_B, counts_G = _groups("grpo", group_ids_B)
    G_BT = returns_to_go(rewards_BT, mask_BT, gamma)
    G0_B = _seq_returns(G_BT, mask_BT)
    mean_G = _group_mean(G0_B, inv_B, counts_G)
    A_BT = _centred(G_BT, mask_BT, mean_G[inv_B])
    if scale_by_std:
        sq_G = torch.zeros_like(mean_G).index_add_(0, inv_B, (G0_B - mean_G[inv_B]) ** 2)
        std_G = (sq_G / (counts_G - 1).clamp(min=1)).sqrt()  # unbiased; 0 for a one-sample group
        std_B1 = std_G[inv_B][:, None]
        A_BT = torch.where(std_B1 > 0, A_BT / (std_B1.clamp(min=min_std) + eps), 0)  # defined even with eps = 0
    return A_BT, G_BT


@register_advantage("dr_grpo")
def dr_grpo(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, gamma: float = 1.0):
    """A_t = G_t - mean_g G_{j,0} (Liu et al. 2025): GRPO without the std; E[grad] = (1 - 1/n) grad J."""
    ids_G, inv_B, counts_G = _groups("dr_grpo", group_ids_B)
    G_BT = returns_to_go(rewards_BT, mask_BT, gamma)
    return _centred(G_BT, mask_BT, _group_mean(_seq_returns(G_BT, mask_BT), inv_B, counts_G)[inv_B]), G_BT


@register_advantage("reinforce_pp")
def reinforce_pp(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, gamma: float = 1.0,
                 eps: float = 1e-8):
    """A_t = (G_t - mean) / sqrt(var + eps), mean and var over the global batch's real tokens (Hu 2025)."""
    G_BT = returns_to_go(rewards_BT, mask_BT, gamma)
    return whiten(G_BT, mask_BT, eps=eps, all_reduce=all_reduce), G_BT


@register_advantage("remax")
def remax(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, baseline: torch.Tensor,
          gamma: float = 1.0):
    """A_t = G_t - baseline_i (Li et al. 2024), baseline (B,) = the return of a greedy sample for row i's prompt."""
    check_rank("baseline", baseline, 1, "(B,)")
    if baseline.shape[0] != mask_BT.shape[0]:
        raise ValueError(f"remax baseline must have shape (B,) = ({mask_BT.shape[0]},), got {tuple(baseline.shape)}")
    check_finite("baseline", baseline)
    G_BT = returns_to_go(rewards_BT, mask_BT, gamma)
    return _centred(G_BT, mask_BT, baseline.to(G_BT.dtype)), G_BT


@register_advantage("gae")
def gae(rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce, gamma: float = 1.0, lam: float = 0.95):
    """A_t = delta_t + gamma lam A_{t'}, delta_t = r_t + gamma V_{t'} - V_t (Schulman et al. 2016).

    t' is the next real token; past the last one V = 0 and A = 0 (terminal, truncated rows too).
    lam = 1: A_t = G_t - V_t; lam = 0: A_t = delta_t, the one-step TD error of A2C. returns = A + V.
    """
    check_unit("gamma", gamma)
    check_unit("lam", lam)
    if values_BT is None:
        raise ValueError("advantage estimator 'gae' needs values (B, T) from a critic")
    r_BT = rewards_BT
    A_BT = torch.zeros_like(r_BT)
    next_v_B = torch.zeros_like(r_BT[:, 0])
    next_a_B = torch.zeros_like(r_BT[:, 0])
    for t in reversed(range(r_BT.shape[1])):
        m_B = mask_BT[:, t]
        a_B = r_BT[:, t] + gamma * next_v_B - values_BT[:, t] + gamma * lam * next_a_B
        next_a_B = torch.where(m_B, a_B, next_a_B)
        next_v_B = torch.where(m_B, values_BT[:, t], next_v_B)
        A_BT[:, t] = torch.where(m_B, a_B, 0)
    return A_BT, torch.where(mask_BT, A_BT + values_BT, 0)


def compute_advantages(name: str, rewards: torch.Tensor, mask: torch.Tensor, *,
                       group_ids: torch.Tensor | None = None, values: torch.Tensor | None = None,
                       all_reduce: AllReduce | None = None, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages_BT, returns_BT) of estimator ``name`` (see the module table). Both (B, T), 0 on padding.

    rewards: (B,) one score per sequence (credited to its last real token) or (B, T) per token.
    mask: (B, T) bool or 0/1, True on real tokens; every row needs one. group_ids: (B,) ints, rows
    sharing a prompt share an id (group estimators). values: (B, T) critic values (``gae``).
    all_reduce: sums a tensor across processes (default: one process). ``**params`` go to the
    estimator and are checked against the ones it takes (:func:`advantage_params`).
    Returns raw (unwhitened) advantages without gradient, and the returns a critic regresses on.
    """
    fn = ADVANTAGE_ESTIMATORS.get(name)
    ADVANTAGE_ESTIMATORS.check_params(name, params)
    mask_BT = check_mask("mask", mask)
    check_no_empty_rows("mask", mask_BT, "every sequence needs a real token to carry its advantage")
    rewards_BT = to_token_rewards(rewards, mask_BT)
    B = mask_BT.shape[0]
    if group_ids is not None:
        check_rank("group_ids", group_ids, 1, "(B,)")
        if group_ids.shape[0] != B or group_ids.is_floating_point():
            raise ValueError(f"group_ids must be integer ids of shape (B,) = ({B},), "
                             f"got {tuple(group_ids.shape)} {group_ids.dtype}")
    values_BT = None
    if values is not None:
        check_same_shape("values", values, "mask", mask_BT)
        check_finite("values", values, mask_BT)
        values_BT = torch.where(mask_BT, values.detach().to(float_dtype(rewards_BT, values)), 0)
        rewards_BT = rewards_BT.to(values_BT.dtype)
    with torch.no_grad():
        return fn(rewards_BT, mask_BT, group_ids_B=group_ids, values_BT=values_BT, all_reduce=all_reduce, **params)
