"""Policy losses (per token, then one aggregation) and the critic's value loss.

With log-probabilities log pi_t under the current policy, log pi_old_t under the sampling
policy, ratio r_t = pi_t / pi_old_t, and constant advantages A_t:

``pg``    l_t = -log pi_t A_t.  The actor loss of REINFORCE / A2C (Williams 1992): its gradient
          is -grad log pi_t A_t, the score-function estimate of -grad E[R].
``ppo``   l_t = max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t)     (Schulman et al. 2017,
          eq. 7, negated). ``clip_low != clip_high`` is DAPO's clip-higher (Yu et al. 2025).
          ``dual_clip = c > 1`` (Ye et al. 2020) also bounds the loss of A < 0 tokens by -c A:
          l_t = min(l_t, -c A_t) where A_t < 0.
``gspo``  GSPO (Zheng et al. 2025) clips the sequence-level ratio
          s_i = exp(1/|o_i| sum_t (log pi_t - log pi_old_t)):  l_i = max(-s_i A_i, -clip(s_i) A_i).
          Implemented per token (the paper's GSPO-token, eq. 13-14): s_{i,t} = sg[s_i] pi_t / sg[pi_t]
          has the value s_i and the gradient s_i grad log pi_t, so with ``seq-mean-token-mean``
          aggregation (as in the paper) value and gradient equal the sequence form; with a
          per-token A_{i,t} it is GSPO-token. Defaults eps = 3e-4 / 4e-4 from the paper.

Every entry of ``POLICY_LOSSES`` has one signature, ``fn(logprobs_BT, advantages_BT, mask_BT, *,
old_logprobs_BT, **params) -> TokenLoss`` (per-token loss plus per-token indicators);
:func:`policy_loss` aggregates with :func:`seqpg.core.aggregate.aggregate_loss` and reduces the
indicators to :class:`PolicyLossStats`. Advantages and old log-probs are constants (detached);
masked positions are replaced by 0 before an entry sees them, so padding never makes NaN.
Log-ratios are clamped to +-20 before exp (as verl does) so a stale token cannot overflow.
``sampler_weights`` (optional, :mod:`seqpg.core.mismatch`) multiply every entry's per-token loss, detached,
before aggregation: the correction for a sampler that is not the trainer, the same for every loss.

Value loss (PPO2 / OpenAI baselines clipped value loss):
    l_t = 1/2 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps, eps) - R_t)^2),
or 1/2 (V_t - R_t)^2 without ``clip_range``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ._checks import check_mask, check_rank, check_same_shape
from .aggregate import Count, aggregate_loss, check_agg_mode
from .registry import Registry

LOG_RATIO_MAX = 20.0

POLICY_LOSSES = Registry("policy loss", positional=("logprobs_BT", "advantages_BT", "mask_BT"),
                         shared=("old_logprobs_BT",))
"""name -> fn(logprobs_BT, advantages_BT, mask_BT, *, old_logprobs_BT, **params) -> TokenLoss."""


def register_policy_loss(name: str) -> Callable:
    """Decorator: register a policy loss under ``name`` (a taken name raises)."""
    return POLICY_LOSSES.register(name)


@dataclass
class TokenLoss:
    """What a policy-loss entry returns: the per-token loss and per-token indicators (all (B, T))."""

    loss_BT: torch.Tensor
    ratio_BT: torch.Tensor | None = None
    """Detached importance ratio the loss applied (None: no ratio, as in ``pg``)."""
    clipped_low_BT: torch.Tensor | None = None
    """bool: the lower clip was active (gradient cut): r < 1 - eps_low and A < 0."""
    clipped_high_BT: torch.Tensor | None = None
    """bool: the upper clip was active: r > 1 + eps_high and A > 0."""
    dual_clipped_BT: torch.Tensor | None = None
    """bool: the dual clip was active: A < 0 and r > c."""


@dataclass
class PolicyLossStats:
    """Detached scalar statistics of one policy-loss call, over this batch's real tokens."""

    loss: torch.Tensor
    clip_frac: torch.Tensor
    """Fraction of tokens whose gradient a clip cut (low + high)."""
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    dual_clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    """k3 estimate of KL(pi_old || pi): mean of r - 1 - log r, r = pi / pi_old (0 without old_logprobs)."""
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    num_tokens: torch.Tensor
    """Real tokens in this batch (local)."""

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


def _require_old(name: str, old_logprobs_BT: torch.Tensor | None) -> None:
    if old_logprobs_BT is None:
        raise ValueError(f"policy loss {name!r} needs old_logprobs (B, T): log-probs of the sampling policy")


def _clipped_surrogate(ratio_BT, adv_BT, clip_low, clip_high):
    """(loss_BT, low_BT, high_BT) of max(-r A, -clip(r, 1 - lo, 1 + hi) A)."""
    if not 0.0 <= clip_low < 1.0 or not clip_high >= 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    loss_BT = torch.maximum(-adv_BT * ratio_BT, -adv_BT * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high))
    r = ratio_BT.detach()
    return loss_BT, (r < 1.0 - clip_low) & (adv_BT < 0), (r > 1.0 + clip_high) & (adv_BT > 0)


@register_policy_loss("pg")
def pg(logprobs_BT, advantages_BT, mask_BT, *, old_logprobs_BT):
    """l_t = -log pi_t A_t (REINFORCE / A2C actor). old_logprobs unused."""
    return TokenLoss(loss_BT=-logprobs_BT * advantages_BT)


@register_policy_loss("ppo")
def ppo(logprobs_BT, advantages_BT, mask_BT, *, old_logprobs_BT, clip_low: float = 0.2, clip_high: float = 0.2,
        dual_clip: float | None = None):
    """l_t = max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A); with dual_clip c: min(l_t, -c A) for A < 0."""
    _require_old("ppo", old_logprobs_BT)
    ratio_BT = torch.exp((logprobs_BT - old_logprobs_BT).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))
    loss_BT, low_BT, high_BT = _clipped_surrogate(ratio_BT, advantages_BT, clip_low, clip_high)
    dual_BT = torch.zeros_like(low_BT)
    if dual_clip is not None:
        if not dual_clip > 1.0:
            raise ValueError(f"ppo dual_clip must be > 1, got {dual_clip}")
        neg_BT = advantages_BT < 0
        bound_BT = -dual_clip * advantages_BT
        dual_BT = neg_BT & (ratio_BT.detach() > dual_clip)
        loss_BT = torch.where(neg_BT, torch.minimum(loss_BT, bound_BT), loss_BT)
    return TokenLoss(loss_BT, ratio_BT.detach(), low_BT, high_BT, dual_BT)


@register_policy_loss("gspo")
def gspo(logprobs_BT, advantages_BT, mask_BT, *, old_logprobs_BT, clip_low: float = 3e-4, clip_high: float = 4e-4):
    """Per-token GSPO: s_{i,t} = sg[s_i] pi_t / sg[pi_t], s_i = exp(mean_t log(pi_t / pi_old_t)), clipped."""
    _require_old("gspo", old_logprobs_BT)
    n_B = mask_BT.sum(dim=1).clamp(min=1)
    seq_log_ratio_B = torch.where(mask_BT, logprobs_BT - old_logprobs_BT, 0).sum(dim=1) / n_B  # (B,)
    seq_log_ratio_B = seq_log_ratio_B.detach().clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    s_BT = torch.exp(logprobs_BT - logprobs_BT.detach() + seq_log_ratio_B[:, None])  # value s_i
    loss_BT, low_BT, high_BT = _clipped_surrogate(s_BT, advantages_BT, clip_low, clip_high)
    return TokenLoss(loss_BT, s_BT.detach(), low_BT, high_BT, torch.zeros_like(low_BT))


def _frac(ind_BT: torch.Tensor | None, mask_BT: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    if ind_BT is None:
        return torch.zeros((), device=mask_BT.device)
    return (ind_BT & mask_BT).sum() / n.clamp(min=1)


def _policy_stats(loss, out: TokenLoss, lp_BT, old_BT, mask_BT) -> PolicyLossStats:
    n = mask_BT.sum()
    lo, hi = _frac(out.clipped_low_BT, mask_BT, n), _frac(out.clipped_high_BT, mask_BT, n)
    ratio_BT = out.ratio_BT
    kl = torch.zeros((), device=mask_BT.device)
    if old_BT is not None:
        log_r_BT = (lp_BT - old_BT).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
        kl = torch.where(mask_BT, torch.expm1(log_r_BT) - log_r_BT, 0).sum() / n.clamp(min=1)
        ratio_BT = ratio_BT if ratio_BT is not None else log_r_BT.exp()
    if ratio_BT is None:
        ratio_BT = torch.ones_like(lp_BT)
    one = torch.ones((), dtype=ratio_BT.dtype, device=mask_BT.device)  # the ratio stats of an empty batch
    real = bool(mask_BT.any())
    r_mean = torch.where(mask_BT, ratio_BT, 0).sum() / n.clamp(min=1) if real else one
    r_min = torch.where(mask_BT, ratio_BT, torch.inf).min() if real else one
    r_max = torch.where(mask_BT, ratio_BT, -torch.inf).max() if real else one
    return PolicyLossStats(loss=loss.detach(), clip_frac=lo + hi, clip_frac_low=lo, clip_frac_high=hi,
                           dual_clip_frac=_frac(out.dual_clipped_BT, mask_BT, n), approx_kl=kl,
                           ratio_mean=r_mean, ratio_min=r_min, ratio_max=r_max, num_tokens=n)


def policy_loss(name: str, logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                old_logprobs: torch.Tensor | None = None, agg: str = "token-mean", num_tokens: Count | None = None,
                num_seqs: Count | None = None, max_len: Count | None = None,
                sampler_weights: torch.Tensor | None = None, **params) -> tuple[torch.Tensor, PolicyLossStats]:
    """(loss, stats) of policy loss ``name`` (module docstring), aggregated by ``agg``.

    logprobs, advantages, mask, old_logprobs: (B, T). ``num_tokens`` / ``num_seqs`` / ``max_len``:
    global counts for split-invariant aggregation (see :mod:`seqpg.core.aggregate`). ``sampler_weights``
    (B, T): importance weights w_t of :func:`seqpg.core.mismatch.sampler_correction`, constants that multiply
    each token's loss (None: none). ``**params`` go to the loss and are checked against the ones it takes
    (e.g. ``clip_low``, ``dual_clip``).
    """
    fn = POLICY_LOSSES.get(name)
    POLICY_LOSSES.check_params(name, params)
    check_agg_mode(agg)
    check_rank("logprobs", logprobs, 2, "(B, T)")
    check_same_shape("advantages", advantages, "logprobs", logprobs)
    mask_BT = check_mask("mask", mask)
    check_same_shape("mask", mask_BT, "logprobs", logprobs)
    lp_BT = torch.where(mask_BT, logprobs, 0)
    adv_BT = torch.where(mask_BT, advantages.detach(), 0).to(lp_BT.dtype)
    old_BT = None
    if old_logprobs is not None:
        check_same_shape("old_logprobs", old_logprobs, "logprobs", logprobs)
        old_BT = torch.where(mask_BT, old_logprobs.detach(), 0).to(lp_BT.dtype)
    out = fn(lp_BT, adv_BT, mask_BT, old_logprobs_BT=old_BT, **params)
    if sampler_weights is not None:
        check_same_shape("sampler_weights", sampler_weights, "logprobs", logprobs)
        out.loss_BT = out.loss_BT * torch.where(mask_BT, sampler_weights.detach(), 0).to(out.loss_BT.dtype)
    loss = aggregate_loss(out.loss_BT, mask_BT, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        stats = _policy_stats(loss, out, lp_BT.detach(), old_BT, mask_BT)
    return loss, stats


@dataclass
class ValueLossStats:
    """Detached scalar statistics of one value-loss call, over this batch's real tokens."""

    loss: torch.Tensor
    clip_frac: torch.Tensor
    """Fraction of tokens where the clipped error was the larger (its gradient is cut)."""
    mse: torch.Tensor
    """Mean of (V - R)^2, unclipped."""
    value_mean: torch.Tensor
    return_mean: torch.Tensor

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


def value_loss(values_BT: torch.Tensor, returns_BT: torch.Tensor, mask_BT: torch.Tensor, *,
               old_values: torch.Tensor | None = None, clip_range: float | None = None, agg: str = "token-mean",
               num_tokens: Count | None = None, num_seqs: Count | None = None,
               max_len: Count | None = None) -> tuple[torch.Tensor, ValueLossStats]:
    """1/2 max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2), or 1/2 (V - R)^2 without clip_range.

    (B, T) inputs; returns and old values are constants. Aggregated like :func:`policy_loss`.
    """
    check_agg_mode(agg)
    check_rank("values_BT", values_BT, 2, "(B, T)")
    check_same_shape("returns_BT", returns_BT, "values_BT", values_BT)
    mask = check_mask("mask_BT", mask_BT)
    check_same_shape("mask_BT", mask, "values_BT", values_BT)
    v_BT = torch.where(mask, values_BT, 0)
    ret_BT = torch.where(mask, returns_BT.detach(), 0).to(v_BT.dtype)
    err_BT = (v_BT - ret_BT) ** 2
    clipped_BT = torch.zeros_like(mask)
    if clip_range is not None:
        if old_values is None:
            raise ValueError("value_loss with clip_range needs old_values (B, T): the values at sampling time")
        if not clip_range > 0:
            raise ValueError(f"value_loss clip_range must be > 0, got {clip_range}")
        check_same_shape("old_values", old_values, "values_BT", values_BT)
        old_BT = torch.where(mask, old_values.detach(), 0).to(v_BT.dtype)
        err_clip_BT = (old_BT + (v_BT - old_BT).clamp(-clip_range, clip_range) - ret_BT) ** 2
        clipped_BT = (err_clip_BT > err_BT).detach() & mask
        loss_BT = 0.5 * torch.maximum(err_BT, err_clip_BT)
    else:
        loss_BT = 0.5 * err_BT
    loss = aggregate_loss(loss_BT, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = ValueLossStats(loss=loss.detach(), clip_frac=clipped_BT.sum() / n,
                               mse=torch.where(mask, err_BT, 0).sum() / n,
                               value_mean=v_BT.sum() / n, return_mean=ret_BT.sum() / n)
    return loss, stats
