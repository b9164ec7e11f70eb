"""The policy-gradient utility of a sequence, and each token's share of it.

For sequence i with tokens y_{i,t}, advantages A_{i,t} and mask m_{i,t}:

    U_i = sum_t m_{i,t} log pi(y_{i,t} | y_{i,<t}) A_{i,t}                         (1)

Williams (1992), REINFORCE: grad E[R] = E[sum_t grad log pi(y_t) A_t] for an advantage A that
is (in expectation) the return minus a baseline independent of y_t, so minimising L = -U (the
``pg`` loss) by gradient descent ascends the expected reward. Each token contributes
log pi * A; a descent step on L moves log pi(y_t) along +A_t: it raises the probability of a
token with A > 0 and lowers it with A < 0. :func:`token_contributions` reports exactly that
per token, for ``seqpg explain``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_mask, check_rank, check_same_shape


@dataclass
class TokenContributions:
    """Each token's term in U = sum_t log pi * A (all (B, T), detached, 0 where masked)."""

    logprob_BT: torch.Tensor
    """log pi(y_t | y_<t) of the token."""
    advantage_BT: torch.Tensor
    """A_t credited to the token."""
    contribution_BT: torch.Tensor
    """log pi * A: the token's term in U."""
    direction_BT: torch.Tensor
    """int8: +1 if a descent step on L = -U raises the token's probability (A > 0), -1 if it lowers it
    (A < 0), 0 if masked or A == 0."""
    mask_BT: torch.Tensor
    """bool: True on real tokens."""


def _inputs(logprobs_BT, advantages_BT, mask_BT):
    check_rank("logprobs_BT", logprobs_BT, 2, "(B, T)")
    check_same_shape("advantages_BT", advantages_BT, "logprobs_BT", logprobs_BT)
    mask = check_mask("mask_BT", mask_BT)
    check_same_shape("mask_BT", mask, "logprobs_BT", logprobs_BT)
    return mask


def utility(logprobs_BT: torch.Tensor, advantages_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """U_i = sum_t m_{i,t} log pi_{i,t} A_{i,t}, eq. (1). (B, T) x3 -> (B,), differentiable in log pi.

    Advantages are constants (detached). A row with no real token has U = 0.
    """
    mask = _inputs(logprobs_BT, advantages_BT, mask_BT)
    return torch.where(mask, logprobs_BT * advantages_BT.detach(), 0).sum(dim=1)  # (B,)


def token_contributions(logprobs_BT: torch.Tensor, advantages_BT: torch.Tensor,
                        mask_BT: torch.Tensor) -> TokenContributions:
    """Per-token terms of :func:`utility` and the direction a descent step on -U moves each token."""
    mask = _inputs(logprobs_BT, advantages_BT, mask_BT)
    lp = torch.where(mask, logprobs_BT.detach(), 0)
    adv = torch.where(mask, advantages_BT.detach(), 0)
    return TokenContributions(
        logprob_BT=lp,
        advantage_BT=adv,
        contribution_BT=lp * adv,
        direction_BT=torch.sign(adv).to(torch.int8),
        mask_BT=mask,
    )
