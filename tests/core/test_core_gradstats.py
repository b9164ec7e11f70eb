"""The lab's statistics on the enumerable toy policy equal the exact values, for every estimator.

A unit is one batch of n = 3 samples of the toy policy (core_helpers.ToyLM, 15 sequences), so all
15^3 = 3375 unit outcomes can be enumerated with their probabilities: the exact figures of
``exact_stats`` are those of the true distribution of each estimator's unit gradient. The lab's
figures from U sampled units (``sample_stats``) must agree within Z jackknife standard errors, and
a deliberately wrong factor on one estimator must be caught.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from core_helpers import ToyLM

from seqpg.core.gradstats import FIGURES, exact_stats, figures, Moments, sample_stats, unit_gradients

Z = 5.0
N = 3
TOY = ToyLM.make(seed=0, dense=True)
THETA = TOY.init_theta(seed=1)
V_TABLE = TOY.state_values(THETA)  # exact V^pi: GAE is unbiased for every lambda
GREEDY = TOY.returns_S[TOY.greedy_index(THETA)]
ESTIMATORS = {  # name -> params (all but per-row ones)
    "reinforce": {}, "reinforce_baseline": {}, "rloo": {}, "grpo": {}, "dr_grpo": {}, "reinforce_pp": {},
    "remax": {}, "gae": {"lam": 0.5},
}
NAMES = list(ESTIMATORS)


def score_STD() -> torch.Tensor:
    """(S, T, K*V) d log pi(y_t | y_<t) / d theta for every toy sequence and token, 0 on padding."""
    p_STV = torch.softmax(TOY.logits(THETA), -1)
    onehot_STV = torch.nn.functional.one_hot(TOY.tokens_ST, 3).to(p_STV.dtype)
    state_STK = torch.nn.functional.one_hot(TOY.state_ST, TOY.n_states).to(p_STV.dtype)
    s = torch.einsum("stk,stv->stkv", state_STK, onehot_STV - p_STV).flatten(2)
    return torch.where(TOY.mask_ST[..., None], s, 0)


SCORE = score_STD()


def unit_grads(idx_UN: torch.Tensor) -> torch.Tensor:
    """(E, U, D) every estimator's unit gradient on the units of sequence indices idx_UN (U, N)."""
    U = idx_UN.shape[0]
    idx = idx_UN.flatten()
    per_row = {"remax": {"baseline": GREEDY.expand(idx.numel()).clone()},
               "gae": {"values": V_TABLE[TOY.state_ST[idx]]}}
    out = []
    for name in NAMES:
        g = unit_gradients(name, TOY.token_rewards_ST[idx], TOY.mask_ST[idx], SCORE[idx],
                           torch.arange(U).repeat_interleave(N), group_ids_B=torch.zeros(idx.numel(), dtype=torch.long),
                           **ESTIMATORS[name], **per_row.get(name, {}))
        out.append(g)
    return torch.stack(out)


@pytest.fixture(scope="module")
def exact():
    idx_UN = torch.tensor(list(itertools.product(range(TOY.tokens_ST.shape[0]), repeat=N)))
    prob_U = TOY.probs(THETA)[idx_UN].prod(1)
    return exact_stats(unit_grads(idx_UN), prob_U, TOY.exact_grad(THETA))


@pytest.fixture(scope="module")
def sampled():
    """(E, U, D) every estimator's gradient on U = 5000 sampled units (the same units for all)."""
    return unit_grads(TOY.sample(THETA, 5000 * N, seed=11).view(-1, N))


def test_unit_gradient_is_the_library_gradient():
    """Eq. (2) equals minus the gradient of policy_loss('pg', seq-mean-token-sum) on one unit."""
    from seqpg import compute_advantages, policy_loss, token_logprobs
    idx = TOY.sample(THETA, N, seed=3)
    rewards, mask = TOY.token_rewards_ST[idx], TOY.mask_ST[idx]
    g = unit_gradients("rloo", rewards, mask, SCORE[idx], torch.zeros(N, dtype=torch.long),
                       group_ids_B=torch.zeros(N, dtype=torch.long))
    th = THETA.clone().requires_grad_()
    adv, _ = compute_advantages("rloo", rewards, mask, group_ids=torch.zeros(N, dtype=torch.long))
    loss, _ = policy_loss("pg", token_logprobs(TOY.logits(th, idx), TOY.tokens_ST[idx]), adv, mask,
                          agg="seq-mean-token-sum")
    loss.backward()
    torch.testing.assert_close(g[0], -th.grad.flatten())


def test_exact_figures_match_theory(exact):
    """Enumeration gives the known biases: 1 for the unbiased, (1 - 1/n) for a mean that holds the sample."""
    b = dict(zip(NAMES, exact.value["bias_factor"].tolist()))
    for name in ("reinforce", "rloo", "remax", "gae"):
        assert b[name] == pytest.approx(1.0, abs=1e-9), name
    assert b["dr_grpo"] == pytest.approx(1 - 1 / N, abs=1e-9)
    assert b["reinforce_baseline"] == pytest.approx(1 - 1 / N, abs=1e-9)  # a batch of one prompt: the same mean
    assert float(TOY.expected_return(THETA)) != pytest.approx(0.0, abs=0.1)  # a reward with a non-zero mean...
    r = dict(zip(NAMES, exact.value["variance_ratio"].tolist()))
    assert r["reinforce"] == 1.0 and r["rloo"] < 1.0  # ...on which RLOO's baseline removes variance
    assert exact.value["cosine_limit"][NAMES.index("reinforce")] == pytest.approx(1.0)


def test_sampled_figures_equal_exact_within_se(exact, sampled):
    """Every figure of every estimator. ``cosine_limit`` of an unbiased estimator sits at its maximum, 1,
    where it is not smooth: its error there is of second order, ~ 1 / (U snr), which the jackknife's
    first-order se misses; that much is allowed on top."""
    U = sampled.shape[1]
    lab = sample_stats(sampled, TOY.exact_grad(THETA))
    assert (lab.se["bias_factor"] < 0.05).all(), "too few units to test anything"
    for k in FIGURES:
        for e, name in enumerate(NAMES):
            est, se, want = float(lab.value[k][e]), float(lab.se[k][e]), float(exact.value[k][e])
            at_max = k == "cosine_limit" and want == pytest.approx(1.0, abs=1e-12)
            tol = Z / (U * float(exact.value["snr"][e])) if at_max else 1e-12
            assert abs(est - want) <= Z * se + tol, f"{name} {k}: {est:.4g} +- {se:.2g}, exact {want:.4g}"


def test_a_wrong_factor_is_caught(exact, sampled):
    """The power check: dr_grpo rescaled by n/(n-1) (i.e. RLOO's scale) no longer matches its exact figures."""
    e = NAMES.index("dr_grpo")
    wrong = sampled.clone()
    wrong[e] *= N / (N - 1)
    lab = sample_stats(wrong, TOY.exact_grad(THETA))
    for k in ("bias_factor", "variance_ratio"):
        assert abs(float(lab.value[k][e] - exact.value[k][e])) > Z * float(lab.se[k][e]), k


def test_units_to_cosine_reaches_the_cosine():
    """Averaging m = units_to_cosine units gives the target cosine (ratio-of-expectations form)."""
    mean = torch.tensor([[1.0, 0.5]])
    m = Moments(mean, torch.tensor([2.0]), mean.pow(2).sum(-1), float("inf"))
    ref = torch.tensor([1.0, 0.0])
    f = figures(m, ref, cosine=0.6)
    units = float(f["units_to_cosine"][0])
    assert float(mean[0, 0]) / (1.25 + 2.0 / units) ** 0.5 == pytest.approx(0.6)
    assert f["cosine_limit"][0] == pytest.approx(1 / 1.25 ** 0.5)
    assert torch.isinf(figures(m, ref, cosine=0.95)["units_to_cosine"][0])  # beyond the limit: never


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="score_BTD"):
        unit_gradients("reinforce", torch.ones(2), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, 5),
                       torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 3 units"):
        sample_stats(torch.ones(1, 2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="reference gradient is 0"):
        sample_stats(torch.randn(1, 5, 3), torch.zeros(3))
