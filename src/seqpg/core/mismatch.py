"""Sampler / trainer mismatch: importance weights that correct for a sampler that is not the trainer.

When the rollout is sampled by a policy pi_s that differs from the trainer's pi (the same weights
read in a lower precision: bf16 or int8 products), the samples come from pi_s, while the policy
gradient asks for samples of pi.  With the per-token ratio

    rho_t = pi(y_t | y_<t) / pi_s(y_t | y_<t) = exp(log pi_t - log pi_s,t)

(pi at the weights that sampled, computed by the trainer's own forward), the corrected loss is
w_t * l_t for every policy loss l_t, with w_t a detached function of rho (Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training", truncated importance sampling;
the masked variant from the follow-up on rollout/training mismatch):

``tis``      w_t = min(rho_t, C)                                     token-level truncated IS
``mis``      w_t = rho_t 1[1/C <= rho_t <= C]                          token-level masked IS
``seq_tis``  w_i = min(rho_i, C),  rho_i = exp(sum_t log rho_t)       one weight per sequence
``seq_mis``  w_i = rho_i 1[1/C <= rho_i <= C]

Truncation bounds the variance a few very unlikely sampler tokens would otherwise bring (the
weight's second moment is at most C^2) at the cost of a bias where the cap binds; masking drops
those tokens (or whole sequences) instead.  With pi_s = pi every rho is exactly 1 and so is every
weight: the correction changes nothing.

Every entry of ``SAMPLER_CORRECTIONS`` has one signature, ``fn(train_logprobs_BT,
sampler_logprobs_BT, mask_BT, *, cap) -> Correction``; :func:`sampler_correction` checks the
arguments.  :func:`mismatch_stats` gives what a step logs about the mismatch (sums, so they can be
reduced across processes).  Log-ratios are clamped to +-20 before exp, as the policy losses do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._checks import check_mask, check_rank, check_same_shape
from .registry import Registry

LOG_RATIO_MAX = 20.0

SAMPLER_CORRECTIONS = Registry("sampler correction", positional=("train_logprobs_BT", "sampler_logprobs_BT", "mask_BT"),
                               shared=("cap",))
"""name -> fn(train_logprobs_BT, sampler_logprobs_BT, mask_BT, *, cap) -> Correction."""


def register_sampler_correction(name: str) -> Callable:
    """Decorator: register a sampler correction under ``name`` (a taken name raises)."""
    return SAMPLER_CORRECTIONS.register(name)


@dataclass
class Correction:
    """Detached per-token importance weights and where the cap acted, (B, T) each, 0 / False on padding."""

    weights_BT: torch.Tensor
    truncated_BT: torch.Tensor
    """bool: the token's weight was truncated to the cap, or masked to 0."""


def _log_ratio(train_BT: torch.Tensor, sampler_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return torch.where(mask_BT, train_BT - sampler_BT, 0).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)


def _seq_log_ratio(train_BT, sampler_BT, mask_BT) -> torch.Tensor:
    """(B, T): each row's summed log-ratio, on each of its tokens."""
    total_B = _log_ratio(train_BT, sampler_BT, mask_BT).sum(dim=1).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    return total_B[:, None].expand_as(train_BT)


def _truncate(log_rho_BT: torch.Tensor, mask_BT: torch.Tensor, cap: float) -> Correction:
    rho_BT = log_rho_BT.exp()
    over_BT = (rho_BT > cap) & mask_BT
    return Correction(torch.where(mask_BT, rho_BT.clamp(max=cap), 0), over_BT)


def _mask(log_rho_BT: torch.Tensor, mask_BT: torch.Tensor, cap: float) -> Correction:
    rho_BT = log_rho_BT.exp()
    out_BT = ((rho_BT > cap) | (rho_BT < 1.0 / cap)) & mask_BT
    return Correction(torch.where(mask_BT & ~out_BT, rho_BT, 0), out_BT)


@register_sampler_correction("tis")
def tis(train_logprobs_BT, sampler_logprobs_BT, mask_BT, *, cap):
    """w_t = min(rho_t, C)."""
    return _truncate(_log_ratio(train_logprobs_BT, sampler_logprobs_BT, mask_BT), mask_BT, cap)


@register_sampler_correction("mis")
def mis(train_logprobs_BT, sampler_logprobs_BT, mask_BT, *, cap):
    """w_t = rho_t where 1/C <= rho_t <= C, else 0."""
    return _mask(_log_ratio(train_logprobs_BT, sampler_logprobs_BT, mask_BT), mask_BT, cap)


@register_sampler_correction("seq_tis")
def seq_tis(train_logprobs_BT, sampler_logprobs_BT, mask_BT, *, cap):
    """w_i = min(rho_i, C) on every token of sequence i, rho_i = prod_t rho_t."""
    return _truncate(_seq_log_ratio(train_logprobs_BT, sampler_logprobs_BT, mask_BT), mask_BT, cap)


@register_sampler_correction("seq_mis")
def seq_mis(train_logprobs_BT, sampler_logprobs_BT, mask_BT, *, cap):
    """w_i = rho_i where 1/C <= rho_i <= C, else 0, on every token of sequence i."""
    return _mask(_seq_log_ratio(train_logprobs_BT, sampler_logprobs_BT, mask_BT), mask_BT, cap)


def _inputs(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor):
    check_rank("train_logprobs", train_logprobs, 2, "(B, T)")
    check_same_shape("sampler_logprobs", sampler_logprobs, "train_logprobs", train_logprobs)
    mask_BT = check_mask("mask", mask)
    check_same_shape("mask", mask_BT, "train_logprobs", train_logprobs)
    dtype = torch.float64 if torch.float64 in (train_logprobs.dtype, sampler_logprobs.dtype) else torch.float32
    return train_logprobs.detach().to(dtype), sampler_logprobs.detach().to(dtype), mask_BT


def sampler_correction(name: str, train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                       *, cap: float = 2.0) -> Correction:
    """The importance weights of correction ``name`` (module docstring), detached.

    train_logprobs: (B, T) log pi of the sampled tokens under the trainer's forward at the sampling
    weights; sampler_logprobs: (B, T) the sampler's own; mask: (B, T) real tokens.  ``cap`` C > 1.
    """
    fn = SAMPLER_CORRECTIONS.get(name)
    if not (isinstance(cap, (int, float)) and 1.0 < cap < float("inf")):
        raise ValueError(f"sampler_correction: cap must be a finite number > 1, got {cap!r}")
    train_BT, sampler_BT, mask_BT = _inputs(train_logprobs, sampler_logprobs, mask)
    return fn(train_BT, sampler_BT, mask_BT, cap=float(cap))


@dataclass
class MismatchStats:
    """Sums over real tokens (so processes can add theirs) of how far sampler and trainer disagree."""

    num_tokens: torch.Tensor
    kl_sum: torch.Tensor
    """sum of k3 = rho - 1 - log rho: an estimate of KL(pi_s || pi) on the sampler's tokens, always >= 0."""
    log_ratio_sum: torch.Tensor
    """sum of log pi_s - log pi: its mean is the log of the trainer's perplexity over the sampler's."""
    truncated_sum: torch.Tensor
    """tokens whose weight the cap truncated or masked."""
    max_abs_log_ratio: torch.Tensor
    """max |log pi - log pi_s| (a max, not a sum: reduce it with a max)."""

    def means(self) -> dict[str, float]:
        """``mismatch/kl``, ``mismatch/ppl_ratio`` (PPL_train / PPL_sampler), ``mismatch/truncated_frac``,
        ``mismatch/max_abs_logp_diff`` of these (possibly reduced) sums."""
        n = max(float(self.num_tokens), 1.0)
        return {"mismatch/kl": float(self.kl_sum) / n,
                "mismatch/ppl_ratio": float(torch.exp(self.log_ratio_sum / n)),
                "mismatch/truncated_frac": float(self.truncated_sum) / n,
                "mismatch/max_abs_logp_diff": float(self.max_abs_log_ratio)}


def mismatch_stats(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                   truncated: torch.Tensor | None = None) -> MismatchStats:
    """Local sums of the sampler / trainer disagreement on the real tokens of (B, T) log-probs;
    ``truncated`` (B, T) bool: the correction's :attr:`Correction.truncated_BT` (None: no correction, 0)."""
    train_BT, sampler_BT, mask_BT = _inputs(train_logprobs, sampler_logprobs, mask)
    log_rho_BT = _log_ratio(train_BT, sampler_BT, mask_BT)
    k3_BT = torch.where(mask_BT, torch.expm1(log_rho_BT) - log_rho_BT, 0)
    zero = torch.zeros((), dtype=train_BT.dtype, device=train_BT.device)
    trunc = zero
    if truncated is not None:
        check_same_shape("truncated", truncated, "train_logprobs", train_logprobs)
        trunc = (truncated & mask_BT).sum().to(train_BT.dtype)
    return MismatchStats(num_tokens=mask_BT.sum().to(train_BT.dtype), kl_sum=k3_BT.sum(),
                         log_ratio_sum=-log_rho_BT.sum(), truncated_sum=trunc,
                         max_abs_log_ratio=log_rho_BT.abs().max() if mask_BT.any() else zero)
