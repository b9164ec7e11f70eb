"""Sampler corrections (TIS / MIS, token and sequence level): hand values, the identity of an exact sampler,
and the weights acting the same way on every policy loss."""

from __future__ import annotations

import math

import pytest
import torch

from seqpg import POLICY_LOSSES, SAMPLER_CORRECTIONS, mismatch_stats, policy_loss, sampler_correction

L3, L4 = math.log(3.0), math.log(4.0)
# row 0: ratios 1, 3, 1/4 and a pad; row 1: ratios 3, 3 (a sequence ratio of 9) and two pads
TRAIN = torch.tensor([[0.0, L3, -L4, 5.0], [L3, L3, 7.0, 7.0]])
SAMPLER = torch.tensor([[0.0, 0.0, 0.0, -5.0], [0.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[True, True, True, False], [True, True, False, False]])

HAND = {  # name -> (weights, truncated), cap 2
    "tis": ([[1, 2, 0.25, 0], [2, 2, 0, 0]], [[0, 1, 0, 0], [1, 1, 0, 0]]),
    "mis": ([[1, 0, 0, 0], [0, 0, 0, 0]], [[0, 1, 1, 0], [1, 1, 0, 0]]),
    "seq_tis": ([[0.75, 0.75, 0.75, 0], [2, 2, 0, 0]], [[0, 0, 0, 0], [1, 1, 0, 0]]),
    "seq_mis": ([[0.75, 0.75, 0.75, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [1, 1, 0, 0]]),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_corrections_by_hand(name):
    weights, truncated = HAND[name]
    out = sampler_correction(name, TRAIN, SAMPLER, MASK, cap=2.0)
    torch.testing.assert_close(out.weights_BT, torch.tensor(weights, dtype=torch.float32))
    assert out.truncated_BT.tolist() == [[bool(v) for v in row] for row in truncated]


def test_every_correction_is_exactly_one_when_sampler_and_trainer_agree():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(5, 7, generator=g) * 4
    mask = torch.rand(5, 7, generator=g) > 0.3
    assert set(SAMPLER_CORRECTIONS) == set(HAND)
    for name in SAMPLER_CORRECTIONS:
        out = sampler_correction(name, lp, lp.clone(), mask, cap=1.5)
        assert torch.equal(out.weights_BT, mask.float()), name
        assert not out.truncated_BT.any(), name


def test_mismatch_stats_by_hand():
    st = mismatch_stats(TRAIN, SAMPLER, MASK, truncated=sampler_correction("tis", TRAIN, SAMPLER, MASK).truncated_BT)
    k3 = [0.0, 3 - 1 - L3, 0.25 - 1 + L4, 3 - 1 - L3, 3 - 1 - L3]
    log_rho = [0.0, L3, -L4, L3, L3]
    m = st.means()
    assert m["mismatch/kl"] == pytest.approx(sum(k3) / 5)
    assert m["mismatch/ppl_ratio"] == pytest.approx(math.exp(-sum(log_rho) / 5))
    assert m["mismatch/truncated_frac"] == pytest.approx(3 / 5)
    assert m["mismatch/max_abs_logp_diff"] == pytest.approx(L4)
    none = mismatch_stats(TRAIN, SAMPLER, MASK).means()
    assert none["mismatch/truncated_frac"] == 0.0 and none["mismatch/kl"] == m["mismatch/kl"]


def test_corrections_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown sampler correction 'is'; valid names: mis, seq_mis, seq_tis, tis"):
        sampler_correction("is", TRAIN, SAMPLER, MASK)
    with pytest.raises(ValueError, match="cap must be a finite number > 1"):
        sampler_correction("tis", TRAIN, SAMPLER, MASK, cap=1.0)
    with pytest.raises(ValueError, match=r"train_logprobs must have shape \(B, T\)"):
        sampler_correction("tis", TRAIN[0], SAMPLER[0], MASK[0])
    with pytest.raises(ValueError, match="sampler_logprobs must have the shape of train_logprobs"):
        sampler_correction("tis", TRAIN, SAMPLER[:, :3], MASK)


def _loss_and_grad(name, lp, adv, mask, old, **kw):
    lp = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(name, lp, adv, mask, old_logprobs=old, agg="seq-mean-token-mean", **kw)
    loss.backward()
    return loss.detach(), lp.grad


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_unit_weights_leave_every_loss_bit_identical(name):
    g = torch.Generator().manual_seed(1)
    lp, old = -torch.rand(4, 6, generator=g) * 3, -torch.rand(4, 6, generator=g) * 3
    adv, mask = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g) > 0.2
    weights = sampler_correction("tis", old, old.clone(), mask).weights_BT
    plain = _loss_and_grad(name, lp, adv, mask, old)
    weighted = _loss_and_grad(name, lp, adv, mask, old, sampler_weights=weights)
    assert torch.equal(plain[0], weighted[0]) and torch.equal(plain[1], weighted[1])


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_weights_multiply_each_tokens_loss_for_every_loss(name):
    """w >= 0 scales a token's loss, clipped or not: the same loss and gradient as advantages w * A."""
    g = torch.Generator().manual_seed(2)
    lp, old = -torch.rand(4, 6, generator=g) * 3, -torch.rand(4, 6, generator=g) * 3
    adv, mask = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g) > 0.2
    w = torch.rand(4, 6, generator=g) * 2
    w[0, 0] = 0.0
    params = {"dual_clip": 3.0} if name == "ppo" else {}
    weighted = _loss_and_grad(name, lp, adv, mask, old, sampler_weights=w, **params)
    scaled = _loss_and_grad(name, lp, adv * w, mask, old, **params)
    torch.testing.assert_close(weighted[0], scaled[0])
    torch.testing.assert_close(weighted[1], scaled[1])
    unweighted = _loss_and_grad(name, lp, adv, mask, old, **params)
    assert not torch.allclose(weighted[1], unweighted[1])  # the weights did act
