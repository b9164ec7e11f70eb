"""The gradient noise scale (McCandlish et al. 2018, appendix A): the paper's two-batch formulas, exact
recovery of |G|^2 and tr(Sigma) from exact expectations whatever the batch sizes, and unbiasedness on
a synthetic problem with known gradient mean and covariance (with a power check)."""

from __future__ import annotations

import pytest
import torch

from seqpg.core import gradient_noise_scale


def test_two_batch_sizes_give_the_papers_a2_and_a3():
    b_small, b_big, g_small, g_big = 4.0, 32.0, 7.5, 2.25
    est = gradient_noise_scale(torch.tensor([g_small, g_big]), torch.tensor([b_small, b_big]))
    grad_sq = (b_big * g_big - b_small * g_small) / (b_big - b_small)
    trace = (g_small - g_big) / (1 / b_small - 1 / b_big)
    assert float(est.grad_sq) == pytest.approx(grad_sq, rel=1e-12)
    assert float(est.trace_cov) == pytest.approx(trace, rel=1e-12)
    assert float(est.b_simple) == pytest.approx(trace / grad_sq, rel=1e-12)


@pytest.mark.parametrize("sizes", [[1, 2], [2, 4, 6, 8], [5, 10, 12], [3, 3, 12, 12], [8, 16, 24, 32, 40]])
def test_exact_expectations_are_recovered_whatever_the_split(sizes):
    """E|G_B|^2 = |G|^2 + tr(Sigma)/B held exactly: every split of a batch gives the same two numbers."""
    grad_sq, trace = 0.3, 12.0
    b = torch.tensor(sizes, dtype=torch.float64)
    est = gradient_noise_scale(grad_sq + trace / b, b)
    assert float(est.grad_sq) == pytest.approx(grad_sq, rel=1e-10)
    assert float(est.trace_cov) == pytest.approx(trace, rel=1e-10)
    assert float(est.b_simple) == pytest.approx(trace / grad_sq, rel=1e-10)


def test_unbiased_on_a_synthetic_problem_with_known_mean_and_covariance():
    """Per-sample gradients g ~ N(G, Sigma); the nested means of a mini-batch split in micro-batches (what
    the update observes) give estimates whose average over trials is |G|^2 and tr(Sigma) within 5
    standard errors, and the errors are small enough that a 10% mistake could not pass."""
    gen = torch.Generator().manual_seed(0)
    D, micro, k, trials = 6, 4, 4, 4000
    G = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.75, -1.0], dtype=torch.float64)
    L = torch.randn(D, D, generator=gen, dtype=torch.float64) * 0.6
    true_sq, true_trace = float(G @ G), float((L @ L.T).trace())
    z = torch.randn(trials, micro * k, D, generator=gen, dtype=torch.float64)
    g = G + z @ L.T  # (trials, B, D) per-sample gradients
    sizes = torch.arange(1, k + 1, dtype=torch.float64) * micro
    prefix_means = torch.stack([g[:, :int(r)].mean(1) for r in sizes], 1)  # (trials, k, D)
    sq = (prefix_means ** 2).sum(-1)
    est = [gradient_noise_scale(sq[t], sizes) for t in range(trials)]
    for name, truth in (("grad_sq", true_sq), ("trace_cov", true_trace)):
        values = torch.stack([getattr(e, name) for e in est])
        mean, se = float(values.mean()), float(values.std() / trials ** 0.5)
        assert abs(mean - truth) < 5 * se, (name, mean, truth, se)
        assert 5 * se < 0.1 * truth, (name, se, truth)  # power: a 10% bias would be caught
    ratio = float(torch.stack([e.trace_cov for e in est]).mean() / torch.stack([e.grad_sq for e in est]).mean())
    assert ratio == pytest.approx(true_trace / true_sq, rel=0.1)


@pytest.mark.parametrize("sq, sizes, message", [
    ([1.0, 2.0], [4.0, 4.0], "two distinct batch sizes"),
    ([1.0, 2.0], [0.0, 4.0], "must be > 0"),
    ([1.0], [4.0, 8.0], "must have the shape"),
    ([[1.0, 2.0]], [[4.0, 8.0]], "rank 1"),
    ([float("nan"), 2.0], [4.0, 8.0], "non-finite"),
])
def test_bad_input_is_refused_by_name(sq, sizes, message):
    with pytest.raises(ValueError, match=message):
        gradient_noise_scale(torch.tensor(sq), torch.tensor(sizes))
