"""Exact expectations on an enumerable policy: the library's Monte-Carlo gradient converges to grad E[R].

For each estimator, N iid sequences are drawn from the toy policy (core_helpers.ToyLM), advantages
come from ``compute_advantages`` and the loss from ``policy_loss("pg", agg="seq-mean-token-sum")``;
minus its gradient w.r.t. the policy table is a Monte-Carlo estimate. Groups of rows (the unit
that estimators couple) are iid, so the per-group estimates give a CLT standard error. The test
asserts, per coordinate, |estimate - factor * grad E[R]| <= 5 se, and along grad E[R] the same
with enough power (se of the projection < 0.02) that a wrong factor would be caught.
"""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import ToyLM

from seqpg import compute_advantages, policy_loss, token_logprobs

Z = 5.0
TOY = ToyLM.make(seed=0)
TOY_DENSE = ToyLM.make(seed=0, dense=True)
THETA = TOY.init_theta(seed=1)


def mc_groups(toy, theta, name, *, n_groups, group_size, seed, dense=False, values_fn=None,
              one_batch_per_group=False, **params):
    """(G, K*V) per-group Monte-Carlo estimates of grad E[R] through the library."""
    idx = toy.sample(theta, n_groups * group_size, seed)
    B = idx.numel()
    mask = toy.mask_ST[idx]
    rewards = toy.token_rewards_ST[idx] if dense else toy.returns_S[idx]
    group_ids = torch.arange(n_groups).repeat_interleave(group_size)
    values = values_fn(idx) if values_fn is not None else None
    if one_batch_per_group:  # each group is a separate call (a separate training batch)
        adv = torch.cat([compute_advantages(name, rewards[g * group_size:(g + 1) * group_size],
                                            mask[g * group_size:(g + 1) * group_size], **params)[0]
                         for g in range(n_groups)])
    else:
        adv, _ = compute_advantages(name, rewards, mask, group_ids=group_ids, values=values, **params)
    logits = toy.logits(theta, idx).detach().requires_grad_()
    loss, _ = policy_loss("pg", token_logprobs(logits, toy.tokens_ST[idx]), adv, mask, agg="seq-mean-token-sum")
    loss.backward()
    h = -B * toy.per_row_grads(logits.grad, idx)  # (B, K*V); their mean is the estimate
    return h.view(n_groups, group_size, -1).mean(1)


def projection(c_GD, target_D):
    """Mean and se of the estimate's coordinate along target, in units of target (1.0 = target)."""
    p_G = c_GD @ target_D / target_D.dot(target_D)
    return float(p_G.mean()), float(p_G.std() / math.sqrt(p_G.numel()))


def assert_converges(c_GD, target_D, factor=1.0):
    est, se = c_GD.mean(0), c_GD.std(0) / math.sqrt(c_GD.shape[0])
    err = (est - factor * target_D).abs()
    assert (err <= Z * se + 1e-12).all(), f"max |err|/se = {float((err / se).max()):.2f}"
    m, s = projection(c_GD, target_D)
    assert s < 0.02, f"too few samples to test anything: se of the projection {s:.3f}"
    assert abs(m - factor) <= Z * s, f"projection {m:.3f} +- {s:.3f}, expected {factor}"
    return m, s


def test_toy_is_a_distribution():
    assert TOY.tokens_ST.shape == (15, 3)
    torch.testing.assert_close(TOY.probs(THETA).sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("dense", [False, True])
def test_reinforce_unbiased(dense):
    toy = TOY_DENSE if dense else TOY
    c = mc_groups(toy, THETA, "reinforce", n_groups=40000, group_size=1, seed=1, dense=dense)
    assert_converges(c, toy.exact_grad(THETA))


def test_rloo_unbiased():
    c = mc_groups(TOY, THETA, "rloo", n_groups=10000, group_size=4, seed=2)
    assert_converges(c, TOY.exact_grad(THETA))


def test_remax_greedy_baseline_unbiased():
    """The greedy sample depends on theta only, not on the samples: an unbiased baseline."""
    greedy_return = TOY.returns_S[TOY.greedy_index(THETA)]
    c = mc_groups(TOY, THETA, "remax", n_groups=40000, group_size=1, seed=3,
                  baseline=greedy_return.expand(40000).clone())
    assert_converges(c, TOY.exact_grad(THETA))


def test_gae_lambda_one_any_prefix_values_unbiased():
    """lam = 1: A_t = G_t - V(y_<t); any values that depend on the prefix only keep it unbiased."""
    table = torch.randn(TOY.n_states, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.5
    c = mc_groups(TOY_DENSE, THETA, "gae", n_groups=40000, group_size=1, seed=4, dense=True,
                  values_fn=lambda idx: table[TOY_DENSE.state_ST[idx]], gamma=1.0, lam=1.0)
    assert_converges(c, TOY_DENSE.exact_grad(THETA))


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_gae_exact_values_unbiased_for_any_lambda(lam):
    """With the true V^pi, E[delta_t | y_<=t] = Q - V: GAE is unbiased for every lam."""
    v_table = TOY_DENSE.state_values(THETA)
    c = mc_groups(TOY_DENSE, THETA, "gae", n_groups=40000, group_size=1, seed=5, dense=True,
                  values_fn=lambda idx: v_table[TOY_DENSE.state_ST[idx]], gamma=1.0, lam=lam)
    assert_converges(c, TOY_DENSE.exact_grad(THETA))


def test_gae_values_that_see_the_token_are_biased():
    """The converse: a 'value' that depends on the sampled token y_t is no baseline (lam = 1)."""
    def values_fn(idx):
        return torch.where(TOY.tokens_ST[idx] == 0, 1.5, -1.0).to(torch.float64)
    c = mc_groups(TOY, THETA, "gae", n_groups=40000, group_size=1, seed=6, values_fn=values_fn, lam=1.0)
    target = TOY.exact_grad(THETA)
    est, se = c.mean(0), c.std(0) / math.sqrt(c.shape[0])
    assert ((est - target).abs() > Z * se).any()


def test_reinforce_baseline_shrinks_by_one_over_batch():
    """b = batch mean includes the sample itself: E[estimate] = (1 - 1/B) grad E[R] (here B = 4)."""
    c = mc_groups(TOY, THETA, "reinforce_baseline", n_groups=10000, group_size=4, seed=7, one_batch_per_group=True)
    m, s = assert_converges(c, TOY.exact_grad(THETA), factor=0.75)
    assert abs(m - 1.0) > Z * s  # and is measurably not unbiased


def test_dr_grpo_shrinks_by_one_over_group():
    """Group mean includes the sample: E = (1 - 1/n) grad E[R]; times n/(n-1) it is RLOO, unbiased."""
    c = mc_groups(TOY, THETA, "dr_grpo", n_groups=10000, group_size=4, seed=8)
    m, s = assert_converges(c, TOY.exact_grad(THETA), factor=0.75)
    assert abs(m - 1.0) > Z * s


@pytest.mark.parametrize("name,group_size", [("grpo", 4), ("reinforce_pp", 4)])
def test_biased_estimators_still_ascend(name, group_size):
    """Biased (std of the sample, global whitening), but the expected step has grad E[R] . g > 0."""
    c = mc_groups(TOY, THETA, name, n_groups=5000, group_size=group_size, seed=9)
    m, s = projection(c, TOY.exact_grad(THETA))
    assert m - Z * s > 0


@pytest.mark.parametrize("name", ["reinforce", "rloo", "grpo", "reinforce_pp", "gae"])
def test_descent_on_minus_utility_raises_exact_reward(name):
    """A few SGD steps on L = -U raise the exact E[R]; the same steps on +U lower it."""
    def train(sign):
        theta = THETA.clone()
        for step in range(5):
            idx = TOY.sample(theta, 2048, seed=100 + step)
            mask = TOY.mask_ST[idx]
            params = {"lam": 1.0, "values": torch.zeros(mask.shape, dtype=torch.float64)} if name == "gae" else {}
            adv, _ = compute_advantages(name, TOY.returns_S[idx], mask,
                                        group_ids=torch.arange(512).repeat_interleave(4), **params)
            th = theta.clone().requires_grad_()
            lp = token_logprobs(TOY.logits(th, idx), TOY.tokens_ST[idx])
            loss, _ = policy_loss("pg", lp, adv, mask, agg="seq-mean-token-sum")
            (sign * loss).backward()
            theta = theta - 0.5 * th.grad
        return float(TOY.expected_return(theta))

    before = float(TOY.expected_return(THETA))
    assert train(+1.0) > before + 0.05
    assert train(-1.0) < before - 0.05
