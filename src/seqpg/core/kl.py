"""KL divergence to a reference policy: per-token estimators, a reward penalty, a loss, controllers.

For a token y_t sampled from pi, with r = log pi_ref(y_t) - log pi(y_t) (Schulman 2020,
"Approximating KL divergence"):

    k1 = -r = log pi - log pi_ref          unbiased for KL(pi || pi_ref), high variance, can be < 0
    k2 = 1/2 r^2                            biased, low variance, >= 0
    k3 = exp(r) - r - 1                     unbiased, low variance, >= 0 (exp(r) >= 1 + r)

The KL enters training in one of two places:

* as a reward penalty (Ziegler et al. 2019; Ouyang et al. 2022), r_t <- r_t - beta * kl_t per
  token, the KL detached. Where a critic learns the values of the shaped return (GAE), the
  penalty goes into the rewards before the advantages (:func:`kl_penalty`). Where the baseline
  comes from samples (GRPO, RLOO, ...), the estimator sees the task reward only and the penalty's
  return-to-go is added to its advantages afterwards, at its own scale (:func:`kl_advantages`):

      A_t = A_task,t - beta * K_t,    K_t = sum_{t' >= t} gamma^(t'-t) kl_t'                (1)

  so no group statistic (a std of order 1e-6 when the task rewards are flat) ever rescales it;
* as a loss term (GRPO, Shao et al. 2024 eq. 3 uses k3): L += beta * agg(kl_t) (:func:`kl_loss`),
  aggregated like the policy loss and differentiated.

Noise floor: a sampler, a trainer's layout and a reference pass disagree on log pi of the same
weights by float rounding (measured in docs/maths.md: ~1e-6 in fp32, ~1e-3 in bf16). Every
estimate takes ``tol``: a token whose |log pi - log pi_ref| <= tol counts as agreeing exactly
(kl_t = 0, no gradient), so that rounding is never turned into an update (an optimizer such as
Adam rescales even a 1e-9 gradient to a full step).

beta is fixed (:class:`FixedKLController`) or adapted towards a target KL (Ziegler et al. 2019,
eq. 2; :class:`AdaptiveKLController`): e = clip(KL / target - 1, -0.2, 0.2),
beta <- beta (1 + e n_steps / horizon).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._checks import check_mask, check_rank, check_same_shape
from .aggregate import Count, aggregate_loss
from .advantages import returns_to_go
from .registry import Registry
from .rewards import to_token_rewards

KL_ESTIMATORS = Registry("KL estimator", positional=("logprobs_BT", "ref_logprobs_BT"))
"""name -> fn(logprobs_BT, ref_logprobs_BT) -> kl_BT."""


def register_kl(name: str) -> Callable:
    """Decorator: register a KL estimator under ``name`` (a taken name raises)."""
    return KL_ESTIMATORS.register(name)


@register_kl("k1")
def k1(logprobs_BT, ref_logprobs_BT):
    """log pi - log pi_ref."""
    return logprobs_BT - ref_logprobs_BT


@register_kl("k2")
def k2(logprobs_BT, ref_logprobs_BT):
    """1/2 (log pi - log pi_ref)^2."""
    return 0.5 * (logprobs_BT - ref_logprobs_BT) ** 2


@register_kl("k3")
def k3(logprobs_BT, ref_logprobs_BT):
    """exp(r) - r - 1, r = log pi_ref - log pi (expm1 keeps it accurate, and >= 0, for small r)."""
    r_BT = ref_logprobs_BT - logprobs_BT
    return torch.expm1(r_BT) - r_BT


def kl_estimate(name: str, logprobs_BT: torch.Tensor, ref_logprobs_BT: torch.Tensor, *, tol: float = 0.0
                ) -> torch.Tensor:
    """Per-token KL estimate ``name`` (k1, k2, k3) of pi against pi_ref. (B, T), (B, T) -> (B, T).

    ``tol`` >= 0: tokens with |log pi - log pi_ref| <= tol get exactly 0 and no gradient (the noise floor).
    """
    fn = KL_ESTIMATORS.get(name)
    check_rank("logprobs_BT", logprobs_BT, 2, "(B, T)")
    check_same_shape("ref_logprobs_BT", ref_logprobs_BT, "logprobs_BT", logprobs_BT)
    if not (isinstance(tol, (int, float)) and 0 <= tol < float("inf")):
        raise ValueError(f"kl_estimate: tol must be a finite number >= 0, got {tol!r}")
    kl_BT = fn(logprobs_BT, ref_logprobs_BT)
    if tol > 0:
        agree_BT = (logprobs_BT.detach() - ref_logprobs_BT.detach()).abs() <= tol
        kl_BT = torch.where(agree_BT, torch.zeros_like(kl_BT), kl_BT)
    return kl_BT


def kl_penalty(rewards: torch.Tensor, kl_BT: torch.Tensor, coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards r_t - coef * kl_t (B, T), 0 on padding; the KL is detached.

    ``rewards`` (B,) is credited to each row's last real token first, (B, T) is used as is.
    """
    mask_BT = check_mask("mask", mask)
    check_same_shape("kl_BT", kl_BT, "mask", mask_BT)
    r_BT = to_token_rewards(rewards, mask_BT)
    return torch.where(mask_BT, r_BT - coef * kl_BT.detach().to(r_BT.dtype), 0)


def kl_advantages(kl_BT: torch.Tensor, coef: float, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """The penalty's share of the advantages, eq. (1): -coef * K_t, K_t the KL's return-to-go. (B, T), 0 on padding.

    Added to a sampled-baseline estimator's advantages of the task reward; the KL is detached.
    """
    mask_BT = check_mask("mask", mask)
    check_same_shape("kl_BT", kl_BT, "mask", mask_BT)
    if not (isinstance(coef, (int, float)) and coef >= 0):
        raise ValueError(f"kl_advantages: coef must be a number >= 0, got {coef!r}")
    return -coef * returns_to_go(kl_BT.detach(), mask_BT, gamma)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *, estimator: str = "k3",
            agg: str = "token-mean", num_tokens: Count | None = None, num_seqs: Count | None = None,
            max_len: Count | None = None, tol: float = 0.0) -> torch.Tensor:
    """agg(kl_t) over real tokens: a differentiable loss term (multiply by beta and add). Scalar.

    The reference log-probs are constants. Aggregation and global counts as in
    :func:`seqpg.core.aggregate.aggregate_loss`; ``tol`` the noise floor of :func:`kl_estimate`.
    """
    check_rank("logprobs", logprobs, 2, "(B, T)")
    check_same_shape("ref_logprobs", ref_logprobs, "logprobs", logprobs)
    mask_BT = check_mask("mask", mask)
    check_same_shape("mask", mask_BT, "logprobs", logprobs)
    lp_BT = torch.where(mask_BT, logprobs, 0)
    ref_BT = torch.where(mask_BT, ref_logprobs.detach(), 0).to(lp_BT.dtype)
    kl_BT = kl_estimate(estimator, lp_BT, ref_BT, tol=tol)
    return aggregate_loss(kl_BT, mask_BT, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)


class FixedKLController:
    """A constant KL coefficient: ``.value`` never changes."""

    def __init__(self, coef: float) -> None:
        if not coef >= 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, kl: float, n_steps: int) -> None:
        """No-op (the signature of :meth:`AdaptiveKLController.update`)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n_steps / horizon) (Ziegler et al. 2019, eq. 2)."""

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if not init_coef >= 0 or not target > 0 or not horizon > 0:
            raise ValueError(f"need init_coef >= 0, target > 0, horizon > 0; got {init_coef}, {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_coef), float(target), float(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        """Move beta towards the target: ``kl`` is the measured KL, ``n_steps`` the samples since the last update."""
        error = min(max(float(kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])
