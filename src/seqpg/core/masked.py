"""Masked reductions and whitening, with statistics that can span processes.

Only real tokens (``mask == True``) count. Batch statistics are built from three sums,

    n = sum_i m_i,    S1 = sum_i m_i x_i,    S2 = sum_i m_i x_i^2,
    mean = S1 / n,    var = (S2 - n mean^2) / (n - 1)     (unbiased, Bessel's correction),

and every one of them goes through ``all_reduce`` before use. ``all_reduce`` is a callable
that SUMS a tensor across processes (``torch.distributed.all_reduce``, which sums in place and
returns None, works as is); the default is the identity, i.e. one process. With it, each
process whitens its share with the statistics of the global batch, so the result does not
depend on how the batch is split. The sums are taken in float64, so ``S2 - n mean^2`` does not
lose the variance to cancellation.

Gradients: the reduced sum is ``S_local + sg[S_global - S_local]``, so each process
differentiates only its own share; summing gradients across processes (as DDP does) then
gives the gradient of the global statistic.

Whitening follows TRL's and verl's ``masked_whiten`` (``(x - mean) * rsqrt(var + eps)``,
unbiased variance); ``shift_mean=False`` adds the mean back (scale only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._checks import check_mask, check_rank, check_same_shape, check_tensor

AllReduce = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Sums a tensor across processes and returns it (or sums in place and returns None)."""


def reduce_sum(t: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    """``t`` summed across processes by ``all_reduce`` (identity when None), keeping the local gradient."""
    if all_reduce is None:
        return t
    local = t.detach().clone()
    out = all_reduce(local)
    total = local if out is None else out
    return t + (total - t.detach())


def _masked_inputs(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = check_tensor("x", x)
    mask = check_mask("mask", mask, rank=x.dim(), dims=f"{tuple(x.shape)}")
    check_same_shape("mask", mask, "x", x)
    return x, mask


def masked_sum(x: torch.Tensor, mask: torch.Tensor, *, dim: int | None = None,
               all_reduce: AllReduce | None = None) -> torch.Tensor:
    """sum of x over real tokens: a scalar (``dim=None``, reduced across processes) or per ``dim``."""
    x, mask = _masked_inputs(x, mask)
    if dim is not None and all_reduce is not None:
        raise ValueError("masked_sum: all_reduce applies to the global sum only (dim=None)")
    total = torch.where(mask, x, 0).sum(dim=dim)
    return total if dim is not None else reduce_sum(total, all_reduce)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, dim: int | None = None,
                all_reduce: AllReduce | None = None) -> torch.Tensor:
    """mean of x over real tokens.

    ``dim=None``: the global mean S1 / n (n and S1 reduced across processes); no real token
    anywhere is an error. ``dim=d``: the mean along ``d``, 0 where that slice has no real token.
    """
    x, mask = _masked_inputs(x, mask)
    if dim is not None:
        if all_reduce is not None:
            raise ValueError("masked_mean: all_reduce applies to the global mean only (dim=None)")
        n = mask.sum(dim=dim).clamp(min=1)
        return torch.where(mask, x, 0).sum(dim=dim) / n
    x64 = torch.where(mask, x.to(torch.float64), 0)
    stats = reduce_sum(torch.stack([mask.sum().to(torch.float64), x64.sum()]), all_reduce)
    if not stats[0] > 0:
        raise ValueError(f"masked_mean: mask (shape {tuple(mask.shape)}) has no real token")
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    return (stats[1] / stats[0]).to(out_dtype)


def _moments(x: torch.Tensor, mask: torch.Tensor, unbiased: bool,
             all_reduce: AllReduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var) in float64 over real tokens, from the reduced (n, S1, S2)."""
    x64 = torch.where(mask, x.to(torch.float64), 0)
    stats = reduce_sum(torch.stack([mask.sum().to(torch.float64), x64.sum(), (x64 * x64).sum()]), all_reduce)
    n, s1, s2 = stats[0], stats[1], stats[2]
    need = 2 if unbiased else 1
    if not n >= need:
        raise ValueError(f"masked variance needs at least {need} real token(s) (unbiased={unbiased}), "
                         f"got {int(n)} (mask shape {tuple(mask.shape)})")
    mean = s1 / n
    var = ((s2 - n * mean * mean) / (n - 1 if unbiased else n)).clamp(min=0.0)
    return mean, var


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True,
               all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Variance of x over real tokens: (S2 - n mean^2) / (n - 1) (``unbiased=False``: / n). Scalar."""
    x, mask = _masked_inputs(x, mask)
    _, var = _moments(x, mask, unbiased, all_reduce)
    return var.to(x.dtype if x.is_floating_point() else torch.float32)


def whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
           all_reduce: AllReduce | None = None) -> torch.Tensor:
    """(x - mean) * rsqrt(var + eps) over real tokens (unbiased var), 0 on padding. (B, T) -> (B, T).

    ``shift_mean=False`` keeps the mean: (x - mean) * rsqrt(var + eps) + mean.
    Statistics are global across processes through ``all_reduce``.
    """
    check_rank("x_BT", x_BT, 2, "(B, T)")
    x, mask = _masked_inputs(x_BT, mask_BT)
    mean, var = _moments(x, mask, True, all_reduce)
    out = (x.to(torch.float64) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0).to(x.dtype)
