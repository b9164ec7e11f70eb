"""Masked reductions and whitening: values, and global statistics across simulated processes."""

from __future__ import annotations

import pytest
import torch
from core_helpers import ThreadGroup

from seqpg import masked_mean, masked_sum, masked_var, whiten

G = torch.Generator().manual_seed(0)
X = torch.randn(6, 5, generator=G, dtype=torch.float64)
M = torch.arange(5)[None, :] < torch.tensor([[5], [2], [0], [4], [1], [3]])


def test_values_against_the_selected_elements():
    sel = X[M]
    torch.testing.assert_close(masked_sum(X, M), sel.sum())
    torch.testing.assert_close(masked_mean(X, M), sel.mean())
    torch.testing.assert_close(masked_var(X, M), sel.var())
    torch.testing.assert_close(masked_var(X, M, unbiased=False), sel.var(correction=0))
    torch.testing.assert_close(masked_mean(X, M, dim=1)[2], torch.tensor(0.0, dtype=torch.float64))  # empty row
    torch.testing.assert_close(masked_mean(X, M, dim=1)[3], X[3, :4].mean())
    torch.testing.assert_close(masked_mean(X, M.float()), sel.mean())


def test_whiten():
    w = whiten(X, M)
    torch.testing.assert_close(w[M].mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(w[M].std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-7, rtol=0)
    assert (w[~M] == 0).all()
    kept = whiten(X, M, shift_mean=False)
    torch.testing.assert_close(kept[M].mean(), X[M].mean())
    torch.testing.assert_close(kept[M] - kept[M].mean(), w[M])


@pytest.mark.parametrize("fn", [masked_sum, masked_mean, masked_var, whiten])
def test_two_processes_see_the_global_statistics(fn):
    full = fn(X, M)
    out = ThreadGroup(2).run(lambda rank, ar: fn(X[rank * 3:(rank + 1) * 3], M[rank * 3:(rank + 1) * 3],
                                                 all_reduce=ar))
    if fn is whiten:
        torch.testing.assert_close(torch.cat(out), full)
    else:
        torch.testing.assert_close(out[0], full)
        torch.testing.assert_close(out[1], full)


def test_in_place_all_reduce_returning_none_works():
    """torch.distributed.all_reduce sums in place and returns None; simulate two equal shards."""
    def doubling(t):
        t.mul_(2)
    torch.testing.assert_close(masked_mean(X, M, all_reduce=doubling), masked_mean(X, M))
    torch.testing.assert_close(masked_sum(X, M, all_reduce=doubling), 2 * masked_sum(X, M))


def test_gradients_of_shares_sum_to_the_global_gradient():
    x_full = X.clone().requires_grad_()
    masked_mean(x_full, M).backward()
    grads = ThreadGroup(2).run(lambda rank, ar: _share_grad(rank, ar))
    torch.testing.assert_close(torch.cat(grads), x_full.grad)


def _share_grad(rank, all_reduce):
    x = X[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    masked_mean(x, M[rank * 3:(rank + 1) * 3], all_reduce=all_reduce).backward()
    return x.grad


def test_errors():
    with pytest.raises(ValueError, match="has no real token"):
        masked_mean(X, torch.zeros_like(M))
    with pytest.raises(ValueError, match=r"at least 2 real token\(s\)"):
        masked_var(X, M & (torch.arange(6)[:, None] == 4))
    with pytest.raises(ValueError, match="global"):
        masked_mean(X, M, dim=1, all_reduce=lambda t: t)
    with pytest.raises(ValueError, match=r"mask must have the shape of x \(6, 5\)"):
        masked_sum(X, M[:, :4])
