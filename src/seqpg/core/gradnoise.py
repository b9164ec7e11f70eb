"""The gradient noise scale of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training",
appendix A), from squared norms of mean gradients over batches of different sizes.

Let G be the true gradient and Sigma the covariance of one sample's gradient.  The mean gradient
G_B of B independent samples has

    E |G_B|^2 = |G|^2 + tr(Sigma) / B                                                   (A.1)

so two batch sizes B_small < B_big give the unbiased estimates (the paper's A.2 and A.3)

    |G|^2    = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

and the simple noise scale B_simple = tr(Sigma) / |G|^2, the batch size beyond which a larger batch
buys little (the critical batch size, when the Hessian is well conditioned).

With K >= 2 observations (sizes B_k, squared norms y_k = |G_{B_k}|^2, each obeying A.1) this fits
y = |G|^2 + tr(Sigma) x with x = 1/B by ordinary least squares: the coefficients are fixed linear
combinations of the y_k, hence unbiased, and for K = 2 they are A.2 and A.3 exactly.  The
observations may overlap (nested batches: the first micro-batch, the first two, ..., the whole
mini-batch), as the paper's small batch is part of its big one: unbiasedness needs only A.1 for
each, not independence.

Departure: B_simple is the ratio of the two estimates of one call; the paper averages numerator
and denominator over many steps (each is unbiased, the ratio is not). ``grad_sq`` can be negative
on a noisy batch; averaging it over steps before dividing is the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_finite, check_rank, check_same_shape


@dataclass(frozen=True)
class GradientNoise:
    """The unbiased estimates of one fit, each a () float64 tensor."""

    grad_sq: torch.Tensor  # () |G|^2
    trace_cov: torch.Tensor  # () tr(Sigma), for one sample
    b_simple: torch.Tensor  # () tr(Sigma) / |G|^2 (inf or nan where |G|^2 is estimated 0)


def gradient_noise_scale(sq_norms_K: torch.Tensor, batch_sizes_K: torch.Tensor) -> GradientNoise:
    """|G|^2, tr(Sigma) and B_simple from K squared norms of mean gradients and their batch sizes.

    sq_norms_K: (K,) |G_{B_k}|^2, the squared norm of the MEAN gradient of batch k.
    batch_sizes_K: (K,) B_k > 0, samples in batch k; at least two distinct values.
    Least squares of sq_norms on 1 / batch_sizes (module docstring); K = 2 is A.2 / A.3 of the paper.
    """
    y = check_rank("sq_norms_K", sq_norms_K, 1, "(K,)").detach().to(torch.float64)
    b = check_same_shape("batch_sizes_K", batch_sizes_K, "sq_norms_K", sq_norms_K).detach().to(torch.float64)
    check_finite("sq_norms_K", y)
    check_finite("batch_sizes_K", b)
    if not bool((b > 0).all()):
        raise ValueError(f"batch_sizes_K must be > 0, got {b.tolist()}")
    x = 1.0 / b
    xc = x - x.mean()
    spread = (xc * xc).sum()
    if not spread > 0:
        raise ValueError(f"gradient_noise_scale needs at least two distinct batch sizes, got {b.tolist()}")
    trace = (xc * (y - y.mean())).sum() / spread
    grad_sq = y.mean() - trace * x.mean()
    return GradientNoise(grad_sq, trace, trace / grad_sq)
