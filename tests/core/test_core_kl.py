"""KL estimators (known values, k3 >= 0, unbiasedness), the reward penalty, the loss, and the controllers."""

from __future__ import annotations

import math

import pytest
import torch

from seqpg import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, aggregate_loss, kl_advantages, kl_estimate,
                   kl_loss, kl_penalty)


def test_known_values():
    lp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    ln2 = math.log(2)
    torch.testing.assert_close(kl_estimate("k1", lp, ref), torch.tensor([[ln2]], dtype=torch.float64))
    torch.testing.assert_close(kl_estimate("k2", lp, ref), torch.tensor([[0.5 * ln2 ** 2]], dtype=torch.float64))
    torch.testing.assert_close(kl_estimate("k3", lp, ref), torch.tensor([[0.5 + ln2 - 1]], dtype=torch.float64))
    for name in KL_ESTIMATORS:
        assert kl_estimate(name, lp, lp).abs().max() == 0


def test_k3_nonnegative_k1_not():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(50, 40, generator=g), torch.randn(50, 40, generator=g)
    assert (kl_estimate("k3", lp, ref) >= 0).all()
    assert (kl_estimate("k2", lp, ref) >= 0).all()
    assert (kl_estimate("k1", lp, ref) < 0).any()


def test_k1_and_k3_are_unbiased_for_kl():
    """Sampling y ~ pi: E[k1] = E[k3] = KL(pi || pi_ref) exactly; checked within 5 standard errors."""
    g = torch.Generator().manual_seed(1)
    log_pi = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    log_ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (log_pi.exp() * (log_pi - log_ref)).sum()
    y = torch.multinomial(log_pi.exp(), 200000, replacement=True, generator=g)
    for name in ("k1", "k3"):
        k = kl_estimate(name, log_pi[y][None], log_ref[y][None])
        assert abs(float(k.mean() - exact)) < 5 * float(k.std()) / math.sqrt(k.numel())
    assert kl_estimate("k3", log_pi[y][None], log_ref[y][None]).var() < kl_estimate("k1", log_pi[y][None],
                                                                                     log_ref[y][None]).var()


def test_kl_penalty_per_token():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.0, 0.5]], requires_grad=True)
    out = kl_penalty(torch.tensor([1.0, 2.0]), kl, 0.5, mask)
    torch.testing.assert_close(out, torch.tensor([[-0.05, 1.0 - 0.1, 0.0], [-0.15, 0.0, 2.0 - 0.25]]))
    assert not out.requires_grad
    dense = kl_penalty(torch.ones(2, 3), kl, 1.0, mask)
    torch.testing.assert_close(dense, torch.where(mask, 1.0 - kl.detach(), 0))


def test_kl_loss_is_aggregated_k3_with_gradient():
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(3, 4, generator=g).requires_grad_()
    ref = torch.randn(3, 4, generator=g).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    loss = kl_loss(lp, ref, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(loss, aggregate_loss(kl_estimate("k3", lp, ref), mask, "seq-mean-token-mean"))
    loss.backward()
    assert ref.grad is None and (lp.grad[mask == 0] == 0).all() and lp.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; valid names: k1, k2, k3"):
        kl_loss(lp, ref, mask, estimator="k4")


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(10.0, 64)
    assert c.value == 0.05
    c2 = FixedKLController(0.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


def test_adaptive_controller_ziegler():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, 256)  # error clipped to +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    v = c.value
    c.update(5.4, 100)  # error -0.1
    assert c.value == pytest.approx(v * (1 - 0.1 * 100 / 10000))
    v = c.value
    c.update(6.0, 1000)  # on target
    assert c.value == pytest.approx(v)
    c.update(0.0, 1000)  # error clipped to -0.2
    assert c.value == pytest.approx(v * (1 - 0.2 * 1000 / 10000))
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(c.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (c.value, 6.0, 10000.0)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, 0.0, 100)


def test_door_checks():
    with pytest.raises(ValueError, match=r"ref_logprobs_BT must have the shape of logprobs_BT \(2, 3\)"):
        kl_estimate("k3", torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"kl_BT must have the shape of mask \(2, 3\)"):
        kl_penalty(torch.ones(2), torch.zeros(2, 2), 0.1, torch.ones(2, 3))


def test_kl_estimate_noise_floor_zeroes_rounding_and_its_gradient():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.0 + 5e-5, -2.5, -3.0 - 2e-3]])
    for name in ("k1", "k2", "k3"):
        k = kl_estimate(name, lp, ref, tol=1e-3)
        assert k[0, 0] == 0 and k[0, 1] != 0 and k[0, 2] != 0  # inside the floor: exactly 0
        (grad,) = torch.autograd.grad(k.sum(), lp)
        assert grad[0, 0] == 0 and grad[0, 1] != 0
        torch.testing.assert_close(k[0, 1:], kl_estimate(name, lp, ref)[0, 1:])  # outside: unchanged
    with pytest.raises(ValueError, match="tol"):
        kl_estimate("k1", lp, ref, tol=-1.0)


def test_kl_advantages_are_minus_beta_times_the_kl_return_to_go():
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 9.0, 0.5]])
    adv = kl_advantages(kl, 0.5, mask)
    torch.testing.assert_close(adv, torch.tensor([[-0.15, -0.1, 0.0], [-0.4, 0.0, -0.25]]))
    adv_g = kl_advantages(kl, 1.0, mask, gamma=0.5)  # holes are skipped: the next real token is discounted once
    torch.testing.assert_close(adv_g, torch.tensor([[-0.2, -0.2, 0.0], [-0.55, 0.0, -0.5]]))


def test_kl_advantages_give_the_exact_gradient_of_the_kl_penalty():
    """On a two-token policy small enough to enumerate, E[sum_t grad log pi(y_t) * A_t] with A = kl_advantages of
    k1 equals -beta * grad KL(pi || pi_ref), exactly: the penalty's share needs no baseline and no group."""
    V, beta = 3, 0.7
    g = torch.Generator().manual_seed(0)
    theta1 = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_()
    theta2 = torch.randn(V, V, generator=g, dtype=torch.float64).requires_grad_()
    ref1, ref2 = torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64)
    ys = [(a, b) for a in range(V) for b in range(V)]

    def logps(t1, t2, y):  # (1, 2): log pi(y_1), log pi(y_2 | y_1)
        return torch.stack([t1.log_softmax(0)[y[0]], t2[y[0]].log_softmax(0)[y[1]]])[None]

    kl_exact = sum(logps(theta1, theta2, y).sum().exp() * (logps(theta1, theta2, y) - logps(ref1, ref2, y)).sum()
                   for y in ys)
    exact = torch.autograd.grad(-beta * kl_exact, (theta1, theta2))
    surrogate = 0
    for y in ys:
        lp = logps(theta1, theta2, y)
        A = kl_advantages(kl_estimate("k1", lp.detach(), logps(ref1, ref2, y)), beta, torch.ones(1, 2, dtype=torch.bool))
        surrogate = surrogate + lp.sum().exp().detach() * (lp * A).sum()  # E_y[sum_t log pi_t * A_t], y weighted by pi
    estimate = torch.autograd.grad(surrogate, (theta1, theta2))
    for e, x in zip(estimate, exact):
        torch.testing.assert_close(e, x, rtol=1e-12, atol=1e-12)
    assert float(exact[0].abs().max()) > 1e-2  # not a comparison of two zeros
