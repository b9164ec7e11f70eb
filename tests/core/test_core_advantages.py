"""Advantage estimators: hand-computed values, identities between estimators, registry and door checks."""

from __future__ import annotations

import pytest
import torch
from core_helpers import ThreadGroup

from seqpg import (ADVANTAGE_ESTIMATORS, Registry, advantage_params, compute_advantages, register_advantage,
                   returns_to_go, whiten)

MASK = torch.tensor([[1, 1, 1, 0],
                     [1, 1, 0, 0],
                     [1, 1, 1, 1],
                     [1, 0, 0, 0]], dtype=torch.bool)


def _dense(seed=0, mask=MASK):
    g = torch.Generator().manual_seed(seed)
    return torch.where(mask, torch.randn(mask.shape, generator=g, dtype=torch.float64), 0)


def test_sequence_reward_goes_on_every_real_token():
    adv, ret = compute_advantages("reinforce", torch.tensor([1.0, -2.0, 0.5, 3.0]), MASK)
    expected = torch.where(MASK, torch.tensor([1.0, -2.0, 0.5, 3.0])[:, None], 0)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected)
    assert adv.dtype == torch.float32


def test_discounted_return_by_hand():
    adv, _ = compute_advantages("reinforce", torch.tensor([1.0]), torch.ones(1, 3), gamma=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.5, 1.0]]))
    r = torch.tensor([[1.0, 2.0, 0.0, 4.0]])
    m = torch.tensor([[1, 1, 0, 1]], dtype=torch.bool)  # a hole: the padded column is skipped
    torch.testing.assert_close(returns_to_go(r, m, 0.5), torch.tensor([[1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 0, 4]]))


def test_reinforce_baseline_by_hand():
    adv, ret = compute_advantages("reinforce_baseline", torch.tensor([1.0, 3.0]), torch.ones(2, 2))
    torch.testing.assert_close(adv, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0], [3.0, 3.0]]))


def test_grpo_by_hand_unbiased_std_and_degenerate_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    adv, _ = compute_advantages("grpo", rewards, torch.ones(8, 2), group_ids=groups)
    std = (4 * 0.25 / 3) ** 0.5  # unbiased (Bessel) std of {1, 0, 0, 1}
    a = 0.5 / (std + 1e-6)
    torch.testing.assert_close(adv[:, 0], torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    assert (adv[4:] == 0).all()  # equal rewards (std 0, 0.1 inexact in binary) and a lone sample: exactly 0
    adv0, _ = compute_advantages("grpo", rewards, torch.ones(8, 2), group_ids=groups, eps=0.0)
    assert (adv0[4:] == 0).all() and torch.isfinite(adv0).all()
    adv2, _ = compute_advantages("grpo", rewards, torch.ones(8, 2), group_ids=groups, scale_by_std=False, eps=0.1)
    torch.testing.assert_close(adv2[:4, 1], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_grpo_zero_std_dense_rewards_give_zero():
    """Equal sequence returns, different per-token rewards: std 0, so A = 0 everywhere (not r / eps)."""
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    adv, _ = compute_advantages("grpo", r, torch.ones(2, 2), group_ids=torch.tensor([3, 3]))
    assert (adv == 0).all()


def test_rloo_by_hand_and_as_scaled_dr_grpo():
    adv, _ = compute_advantages("rloo", torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.ones(4, 1),
                                group_ids=torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv[:, 0], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]))
    r = torch.randn(9, generator=torch.Generator().manual_seed(1))  # sequence rewards: the identity is on R
    groups = torch.tensor([5, 5, 5, 9, 9, 9, 2, 2, 2])  # three groups of n = 3
    m = torch.ones(9, 2)
    a_rloo, _ = compute_advantages("rloo", r, m, group_ids=groups)
    a_dr, _ = compute_advantages("dr_grpo", r, m, group_ids=groups)
    torch.testing.assert_close(a_rloo, 3 / (3 - 1) * a_dr)


def test_dr_grpo_is_grpo_without_std():
    r, groups = _dense(2), torch.tensor([0, 1, 0, 1])
    a1, r1 = compute_advantages("dr_grpo", r, MASK, group_ids=groups, gamma=0.9)
    a2, r2 = compute_advantages("grpo", r, MASK, group_ids=groups, gamma=0.9, scale_by_std=False)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


def test_remax_subtracts_the_greedy_baseline():
    adv, _ = compute_advantages("remax", torch.tensor([1.0, 0.0, 2.0, 2.0]), MASK,
                                baseline=torch.tensor([0.5, 0.5, 1.0, 3.0]))
    torch.testing.assert_close(adv, torch.where(MASK, torch.tensor([0.5, -0.5, 1.0, -1.0])[:, None], 0))


def test_reinforce_pp_whitens_the_return_to_go():
    r = _dense(3)
    adv, ret = compute_advantages("reinforce_pp", r, MASK, gamma=0.95)
    torch.testing.assert_close(adv, whiten(returns_to_go(r, MASK, 0.95), MASK))
    real = adv[MASK]
    torch.testing.assert_close(real.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(real.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    r, v = _dense(4), _dense(5)
    adv, ret = compute_advantages("gae", r, MASK, values=v, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, torch.where(MASK, returns_to_go(r, MASK, 0.9) - v, 0))
    torch.testing.assert_close(ret, torch.where(MASK, adv + v, 0))


def test_gae_lambda_zero_is_td_error():
    r, v = _dense(6), _dense(7)
    adv, _ = compute_advantages("gae", r, MASK, values=v, gamma=0.8, lam=0.0)
    v_next = torch.cat([v[:, 1:], torch.zeros(4, 1, dtype=v.dtype)], dim=1) * MASK.roll(-1, 1) * MASK
    v_next[:, -1] = 0  # terminal after the last column
    torch.testing.assert_close(adv, torch.where(MASK, r + 0.8 * v_next - v, 0))


def test_gae_by_hand():
    """delta = r + gamma V' - V, A = delta + gamma lam A'; V after the last token is 0."""
    r, v = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]])
    adv, _ = compute_advantages("gae", r, torch.ones(1, 2), values=v, gamma=0.5, lam=0.5)
    d1 = 1.0 + 0 - 0.25
    d0 = 0.0 + 0.5 * 0.25 - 0.5
    torch.testing.assert_close(adv, torch.tensor([[d0 + 0.25 * d1, d1]]))


def test_gae_skips_holes_like_the_compacted_sequence():
    r, v = torch.tensor([[1.0, 9.0, 2.0, 3.0]]), torch.tensor([[0.5, 9.0, -1.0, 2.0]])
    holed, _ = compute_advantages("gae", r, torch.tensor([[1, 0, 1, 1]]), values=v, gamma=0.9, lam=0.7)
    compact, _ = compute_advantages("gae", r[:, [0, 2, 3]], torch.ones(1, 3), values=v[:, [0, 2, 3]],
                                    gamma=0.9, lam=0.7)
    torch.testing.assert_close(holed[:, [0, 2, 3]], compact)
    assert holed[0, 1] == 0


def test_advantages_carry_no_gradient_and_mask_dtypes_agree():
    v = _dense(8).requires_grad_()
    a_bool, _ = compute_advantages("gae", _dense(9), MASK, values=v)
    a_float, _ = compute_advantages("gae", _dense(9), MASK.double(), values=v)
    assert not a_bool.requires_grad
    torch.testing.assert_close(a_bool, a_float)


@pytest.mark.parametrize("name", ["reinforce_baseline", "reinforce_pp"])
def test_batch_statistics_through_all_reduce_match_full_batch(name):
    r, m = _dense(10, MASK.repeat(2, 1)), MASK.repeat(2, 1)
    full, _ = compute_advantages(name, r, m)
    shards = ThreadGroup(2).run(lambda rank, ar: compute_advantages(name, r[rank * 4:(rank + 1) * 4],
                                                                    m[rank * 4:(rank + 1) * 4], all_reduce=ar)[0])
    torch.testing.assert_close(torch.cat(shards), full)
    alone, _ = compute_advantages(name, r[:4], m[:4])  # without all_reduce a shard sees local statistics
    assert not torch.allclose(alone, full[:4])


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; valid names: dr_grpo, gae, grpo"):
        compute_advantages("ppo", torch.ones(1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda rewards_BT, mask_BT, *, group_ids_B, values_BT, all_reduce: None)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['lambda'\]; it accepts: gamma, lam"):
        compute_advantages("gae", torch.ones(1), torch.ones(1, 1), values=torch.ones(1, 1), **{"lambda": 0.9})
    with pytest.raises(ValueError, match=r"requires parameter\(s\) \['baseline'\]"):
        compute_advantages("remax", torch.ones(1), torch.ones(1, 1))
    assert set(advantage_params("grpo")) == {"gamma", "scale_by_std", "eps", "min_std"}
    assert set(ADVANTAGE_ESTIMATORS) == {"reinforce", "reinforce_baseline", "rloo", "grpo", "dr_grpo",
                                         "reinforce_pp", "remax", "gae"}


def test_registry_enforces_one_signature():
    reg = Registry("thing", positional=("rewards_BT", "mask_BT"), shared=("all_reduce",))
    with pytest.raises(TypeError, match="shared keyword arguments"):
        reg.register("a")(lambda rewards_BT, mask_BT, *, gamma=1.0: None)
    with pytest.raises(TypeError, match="keyword-only"):
        reg.register("b")(lambda rewards_BT, mask_BT, gamma, *, all_reduce: None)
    with pytest.raises(TypeError, match="positional arguments"):
        reg.register("c")(lambda r, m, *, all_reduce: None)
    reg.register("ok")(lambda rewards_BT, mask_BT, *, all_reduce, k=2: None)
    assert reg.params("ok") == {"k": 2} and "ok" in reg and len(reg) == 1


def test_door_checks():
    ones = torch.ones(2, 3)
    with pytest.raises(ValueError, match="rloo needs at least 2 samples per group; groups with one sample: \\[7\\]"):
        compute_advantages("rloo", torch.ones(3), torch.ones(3, 2), group_ids=torch.tensor([1, 1, 7]))
    with pytest.raises(ValueError, match="'grpo' needs group_ids"):
        compute_advantages("grpo", torch.ones(2), ones)
    with pytest.raises(ValueError, match="'gae' needs values"):
        compute_advantages("gae", torch.ones(2), ones)
    with pytest.raises(ValueError, match=r"rewards holds a non-finite value \(nan\) at row 1"):
        compute_advantages("reinforce", torch.tensor([0.0, float("nan")]), ones)
    with pytest.raises(ValueError, match="rows with no real token: \\[1\\]"):
        compute_advantages("reinforce", torch.ones(2), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"rewards of shape \(B,\) must have B = 2 rows"):
        compute_advantages("reinforce", torch.ones(3), ones)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\) \(rank 2\), got shape \(2,\)"):
        compute_advantages("reinforce", torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="hold only 0 and 1"):
        compute_advantages("reinforce", torch.ones(2), ones * 0.5)
    with pytest.raises(ValueError, match=r"values must have the shape of mask \(2, 3\), got \(2, 2\)"):
        compute_advantages("gae", torch.ones(2), ones, values=torch.ones(2, 2))
    with pytest.raises(ValueError, match="gamma must be a number in \\[0, 1\\]"):
        compute_advantages("reinforce", torch.ones(2), ones, gamma=1.5)
    with pytest.raises(ValueError, match="group_ids must be integer ids"):
        compute_advantages("grpo", torch.ones(2), ones, group_ids=torch.tensor([0.0, 1.0]))


def test_grpo_min_std_keeps_rounding_from_becoming_unit_advantages():
    """A group whose returns differ by rounding (1e-5) gets |A| <= 1e-5 / min_std, not +-0.6; a real spread is
    untouched."""
    mask = torch.ones(4, 2, dtype=torch.bool)
    ids = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([0.5, 0.5 + 1e-5, 0.0, 1.0], dtype=torch.float64)
    adv, _ = compute_advantages("grpo", rewards, mask, group_ids=ids)
    assert float(adv[:2].abs().max()) <= 0.5e-5 / 1e-3
    torch.testing.assert_close(adv[2:, 0], torch.tensor([-0.5, 0.5], dtype=torch.float64) / (0.5 ** 0.5 + 1e-6))
    loose, _ = compute_advantages("grpo", rewards, mask, group_ids=ids, min_std=0.0)
    assert float(loose[:2].abs().max()) > 0.5  # the guard is what keeps it small
    with pytest.raises(ValueError, match="min_std"):
        compute_advantages("grpo", rewards, mask, group_ids=ids, min_std=-1.0)
