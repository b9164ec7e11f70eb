"""Policy and value losses: hand values, identities, published formulas, and split invariance."""

from __future__ import annotations

import pytest
import torch
from core_helpers import ThreadGroup

from seqpg import (AGG_MODES, POLICY_LOSSES, aggregate_loss, compute_advantages, kl_loss, policy_loss,
                   value_loss)

LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 2 is empty


@pytest.mark.parametrize("mode,expected", [("token-mean", 10 / 4), ("seq-mean-token-mean", (2 + 4 + 0) / 3),
                                           ("seq-mean-token-sum", 10 / 3), ("seq-mean-token-sum-norm", 10 / 9)])
def test_aggregation_by_hand_empty_row_contributes_zero_and_counts(mode, expected):
    torch.testing.assert_close(aggregate_loss(LOSS_MAT, LOSS_MASK, mode), torch.tensor(expected))


def test_aggregation_global_counts_and_empty_batch():
    torch.testing.assert_close(aggregate_loss(LOSS_MAT, LOSS_MASK, "seq-mean-token-sum-norm", max_len=5),
                               torch.tensor(10 / 15))
    torch.testing.assert_close(aggregate_loss(LOSS_MAT, LOSS_MASK, "token-mean", num_tokens=8), torch.tensor(10 / 8))
    torch.testing.assert_close(aggregate_loss(LOSS_MAT, LOSS_MASK, "seq-mean-token-sum", num_seqs=5),
                               torch.tensor(10 / 5))
    assert aggregate_loss(LOSS_MAT, torch.zeros(3, 3), "token-mean") == 0
    with pytest.raises(ValueError, match="valid modes: token-mean, seq-mean-token-mean"):
        aggregate_loss(LOSS_MAT, LOSS_MASK, "mean")
    with pytest.raises(ValueError, match="num_tokens must be a number > 0"):
        aggregate_loss(LOSS_MAT, LOSS_MASK, "token-mean", num_tokens=0)


def test_verl_aggregation_modes_as_documented():
    """verl's agg_loss, written out (no empty rows: verl gives NaN there)."""
    g = torch.Generator().manual_seed(0)
    loss, mask = torch.randn(4, 6, generator=g), torch.arange(6)[None, :] < torch.tensor([[6], [2], [5], [1]])
    m = mask.float()
    verl = {
        "token-mean": (loss * m).sum() / m.sum(),
        "seq-mean-token-sum": (loss * m).sum(-1).mean(),
        "seq-mean-token-mean": ((loss * m).sum(-1) / m.sum(-1)).mean(),
        "seq-mean-token-sum-norm": (loss * m).sum() / m.shape[-1],
    }
    for mode in AGG_MODES:
        ours = aggregate_loss(loss, mask, mode)
        if mode == "seq-mean-token-sum-norm":  # ours also averages over rows (Dr. GRPO's 1/G); verl does not
            ours = ours * loss.shape[0]
        torch.testing.assert_close(ours, verl[mode])


def _batch(B=5, T=6, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 0, 5, 1])[:B]  # row 2 empty
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return lp, old, adv, mask


def test_pg_hand_value_and_gradient_raises_good_tokens():
    lp = torch.tensor([[-3.0, -1.2]], requires_grad=True)
    loss, _ = policy_loss("pg", lp, torch.tensor([[4.0, 2.0]]), torch.ones(1, 2), agg="seq-mean-token-sum")
    torch.testing.assert_close(loss, torch.tensor(14.4))  # L = -U = -(-12.0 - 2.4)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-4.0, -2.0]]))  # descent raises log pi along +A


def test_ppo_equals_pg_gradient_when_old_equals_new():
    lp, _, adv, mask = _batch()
    for agg in AGG_MODES:
        grads, values = [], []
        for name in ("pg", "ppo"):
            x = lp.clone().requires_grad_()
            loss, stats = policy_loss(name, x, adv, mask, old_logprobs=lp, agg=agg)
            loss.backward()
            grads.append(x.grad)
            values.append(loss)
        torch.testing.assert_close(grads[1], grads[0])
        # values: pg is agg(-log pi A); ppo at ratio 1 is agg(-A), the same surrogate's value at r = pi/pi_old
        torch.testing.assert_close(values[0], aggregate_loss(-lp * adv, mask, agg))
        torch.testing.assert_close(values[1], aggregate_loss(-adv, mask, agg))
        assert stats.clip_frac == 0 and stats.approx_kl == 0 and stats.ratio_max == 1


def test_ppo_clip_indicators_and_dual_clip_by_hand():
    old = torch.zeros(1, 4, dtype=torch.float64)
    ratio = torch.tensor([[1.5, 0.5, 1.5, 5.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    x = ratio.log().requires_grad_()
    loss, st = policy_loss("ppo", x, adv, torch.ones(1, 4), old_logprobs=old, agg="seq-mean-token-sum",
                           dual_clip=3.0)
    # per token: -1.2 (high clip), 0.8 (low clip), 1.5 (A < 0, r > 1: unclipped), min(5, 3) = 3 (dual clip)
    torch.testing.assert_close(loss, torch.tensor(-1.2 + 0.8 + 1.5 + 3.0, dtype=torch.float64))
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0, 1.5, 0.0]], dtype=torch.float64))
    assert (st.clip_frac_high, st.clip_frac_low, st.clip_frac, st.dual_clip_frac) == (0.25, 0.25, 0.5, 0.25)
    torch.testing.assert_close(st.approx_kl, (ratio - 1 - ratio.log()).mean())
    torch.testing.assert_close(st.ratio_max, torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(st.ratio_min, torch.tensor(0.5, dtype=torch.float64))


def test_gspo_equals_sequence_level_formula():
    """Zheng et al. 2025: J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i), s_i = (pi/pi_old)^(1/|o_i|)."""
    lp, _, _, mask = _batch()
    # per-row sequence log-ratios: clipped high (A > 0), clipped low (A < 0), empty, inside, inside
    delta_B = torch.tensor([1e-3, -1e-3, 0.0, 1e-4, -1e-3], dtype=torch.float64)
    noise = torch.where(mask, torch.randn(lp.shape, generator=torch.Generator().manual_seed(9)), 0).double()
    noise = torch.where(mask, noise - noise.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1), 0)
    old = lp - delta_B[:, None] + 0.01 * noise  # token ratios differ from the sequence ratio
    adv_B = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5], dtype=torch.float64)
    adv = adv_B[:, None].expand_as(lp)
    x = lp.clone().requires_grad_()
    ours, st = policy_loss("gspo", x, adv, mask, old_logprobs=old, agg="seq-mean-token-mean")
    ours.backward()
    y = lp.clone().requires_grad_()
    terms = []
    for i in range(lp.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            terms.append(torch.zeros((), dtype=torch.float64))
            continue
        s = torch.exp((y[i, :n] - old[i, :n]).sum() / n)
        terms.append(torch.minimum(s * adv_B[i], s.clamp(1 - 3e-4, 1 + 4e-4) * adv_B[i]))
    ref = -torch.stack(terms).mean()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(x.grad, y.grad)
    n = mask.sum(1).float()
    torch.testing.assert_close(st.clip_frac_high, n[0] / n.sum())  # the clip is per sequence
    torch.testing.assert_close(st.clip_frac_low, n[1] / n.sum())


def test_dapo_token_level_loss_parity():
    """Yu et al. 2025: J = 1/sum_i |o_i| sum_i sum_t min(r A, clip(r, 1 - 0.2, 1 + 0.28) A)."""
    lp, old, adv, mask = _batch()
    ours, _ = policy_loss("ppo", lp, adv, mask, old_logprobs=old, clip_low=0.2, clip_high=0.28)
    total, count = 0.0, 0
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[i, t]:
                r = torch.exp(lp[i, t] - old[i, t])
                total += torch.minimum(r * adv[i, t], r.clamp(0.8, 1.28) * adv[i, t])
                count += 1
    torch.testing.assert_close(ours, -total / count)


def test_grpo_loss_parity_deepseekmath():
    """Shao et al. 2024 eq. 3: J = 1/G sum_i 1/|o_i| sum_t [min(r A, clip(r) A) - beta D_KL], per question,
    A_i = (r_i - mean(r)) / std(r), D_KL = pi_ref/pi - log(pi_ref/pi) - 1; averaged over questions."""
    g = torch.Generator().manual_seed(3)
    B, T, beta = 8, 5, 0.04
    lengths = torch.tensor([5, 2, 4, 1, 3, 5, 2, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, _ = compute_advantages("grpo", rewards, mask, group_ids=groups, eps=0.0)
    pg, _ = policy_loss("ppo", lp, adv, mask, old_logprobs=old, agg="seq-mean-token-mean")
    ours = pg + beta * kl_loss(lp, ref, mask, estimator="k3", agg="seq-mean-token-mean")
    questions = []
    for q in range(2):
        rq = rewards[4 * q:4 * q + 4]
        a_q = (rq - rq.mean()) / rq.std()
        per_o = []
        for j in range(4):
            i, n = 4 * q + j, int(lengths[4 * q + j])
            ratio = torch.exp(lp[i, :n] - old[i, :n])
            surr = torch.minimum(ratio * a_q[j], ratio.clamp(0.8, 1.2) * a_q[j])
            d_kl = torch.exp(ref[i, :n] - lp[i, :n]) - (ref[i, :n] - lp[i, :n]) - 1
            per_o.append((surr - beta * d_kl).sum() / n)
        questions.append(torch.stack(per_o).mean())
    torch.testing.assert_close(ours, -torch.stack(questions).mean())


def test_dr_grpo_loss_parity():
    """Liu et al. 2025: A_i = r_i - mean(r) (no std), J = 1/G sum_i sum_t min(r A, clip(r) A) / L_max."""
    lp, old, _, mask = _batch()
    mask[2, 0] = True  # every row a real sample here
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    adv, _ = compute_advantages("dr_grpo", rewards, mask, group_ids=torch.zeros(5, dtype=torch.long))
    L_max = 10
    ours, _ = policy_loss("ppo", lp, adv, mask, old_logprobs=old, agg="seq-mean-token-sum-norm", max_len=L_max)
    a = rewards - rewards.mean()
    per_o = []
    for i in range(5):
        n = int(mask[i].sum())
        ratio = torch.exp(lp[i, :n] - old[i, :n])
        per_o.append(torch.minimum(ratio * a[i], ratio.clamp(0.8, 1.2) * a[i]).sum() / L_max)
    torch.testing.assert_close(ours, -torch.stack(per_o).mean())


def test_empty_row_in_policy_loss_counts_but_contributes_zero():
    lp, old, adv, mask = _batch()
    keep = torch.tensor([0, 1, 3, 4])
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        with_empty, _ = policy_loss("ppo", lp, adv, mask, old_logprobs=old, agg=agg)
        without, _ = policy_loss("ppo", lp[keep], adv[keep], mask[keep], old_logprobs=old[keep], agg=agg)
        torch.testing.assert_close(with_empty, without * 4 / 5)


def test_padding_garbage_never_reaches_the_loss():
    lp, old, adv, mask = _batch()
    lp2, old2, adv2 = lp.clone(), old.clone(), adv.clone()
    lp2[~mask], old2[~mask], adv2[~mask] = -torch.inf, torch.nan, torch.inf
    for name in POLICY_LOSSES:
        x = lp2.clone().requires_grad_()
        loss, _ = policy_loss(name, x, adv2, mask, old_logprobs=old2)
        loss.backward()
        torch.testing.assert_close(loss, policy_loss(name, lp, adv, mask, old_logprobs=old)[0])
        assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


SPLITS = [[0, 1], [2], [3, 4]]  # micro-batches of rows; each trimmed to its own longest row


def _share_loss(name, x, old, adv, mask, agg, counts, **params):
    if name == "value":
        return value_loss(x, adv, mask, old_values=old, clip_range=0.2, agg=agg, **counts)[0]
    if name == "kl":
        return kl_loss(x, old, mask, estimator="k3", agg=agg, **counts)
    return policy_loss(name, x, adv, mask, old_logprobs=old, agg=agg, **counts, **params)[0]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name,params", [("pg", {}), ("ppo", {"dual_clip": 3.0, "clip_high": 0.28}),
                                         ("gspo", {"clip_low": 0.05, "clip_high": 0.05}), ("value", {}),
                                         ("kl", {})])
def test_micro_batches_with_global_counts_sum_to_full_batch(name, params, agg):
    lp, old, adv, mask = _batch(spread=0.3)
    full_x = lp.clone().requires_grad_()
    full = _share_loss(name, full_x, old, adv, mask, agg, {}, **params)
    full.backward()
    counts = dict(num_tokens=float(mask.sum()), num_seqs=mask.shape[0], max_len=mask.shape[1])
    x = lp.clone().requires_grad_()
    total = 0.0
    for rows in SPLITS:
        width = max(int(mask[rows].sum(1).max()), 1)
        sl = (rows, slice(0, width))
        share = _share_loss(name, x[sl], old[sl], adv[sl], mask[sl], agg, counts, **params)
        share.backward()
        total = total + share.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(x.grad, full_x.grad)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", ["pg", "ppo", "gspo"])
def test_two_processes_with_all_reduced_counts_sum_to_full_batch(name, agg):
    lp, old, adv, mask = _batch(spread=0.3)
    full_x = lp.clone().requires_grad_()
    full, _ = policy_loss(name, full_x, adv, mask, old_logprobs=old, agg=agg)
    full.backward()
    shards = [torch.tensor([0, 2, 4]), torch.tensor([1, 3])]

    def process(rank, all_reduce):
        rows = shards[rank]
        m = mask[rows]
        n_tok, n_seq = all_reduce(torch.tensor([float(m.sum()), float(m.shape[0])])).tolist()
        x = lp[rows].clone().requires_grad_()
        loss, _ = policy_loss(name, x, adv[rows], m, old_logprobs=old[rows], agg=agg, num_tokens=n_tok,
                              num_seqs=n_seq, max_len=mask.shape[1])
        loss.backward()
        return loss.detach(), x.grad

    out = ThreadGroup(2).run(process)
    torch.testing.assert_close(out[0][0] + out[1][0], full.detach())
    grad = torch.zeros_like(lp)
    for rank in range(2):
        grad[shards[rank]] += out[rank][1]
    torch.testing.assert_close(grad, full_x.grad)


def test_local_token_mean_is_not_split_invariant():
    """The negative control: without the global count, averaging micro-batch means changes the loss."""
    lp, old, adv, mask = _batch()
    full, _ = policy_loss("pg", lp, adv, mask)
    parts = [policy_loss("pg", lp[r], adv[r], mask[r])[0] for r in SPLITS]
    assert not torch.allclose(sum(parts) / len(parts), full)


def test_value_loss_by_hand():
    v = torch.tensor([[2.0, 1.0]], requires_grad=True)
    ret, old = torch.tensor([[3.0, 1.5]]), torch.tensor([[1.0, 1.0]])
    loss, st = value_loss(v, ret, torch.ones(1, 2), old_values=old, clip_range=0.5, agg="seq-mean-token-sum")
    # token 0: max((2-3)^2, (1.5-3)^2) = 2.25 (clipped); token 1: max(0.25, 0.25) = 0.25
    torch.testing.assert_close(loss, torch.tensor(0.5 * 2.25 + 0.5 * 0.25))
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -0.5]]))
    assert st.clip_frac == 0.5
    torch.testing.assert_close(st.mse, torch.tensor((1.0 + 0.25) / 2))
    plain, _ = value_loss(v, ret, torch.ones(1, 2))
    torch.testing.assert_close(plain, torch.tensor((0.5 * 1.0 + 0.5 * 0.25) / 2))
    with pytest.raises(ValueError, match="needs old_values"):
        value_loss(v, ret, torch.ones(1, 2), clip_range=0.2)


def test_policy_loss_errors():
    lp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="'ppo' needs old_logprobs"):
        policy_loss("ppo", lp, adv, mask)
    with pytest.raises(ValueError, match="'gspo' needs old_logprobs"):
        policy_loss("gspo", lp, adv, mask)
    with pytest.raises(ValueError, match="unknown policy loss 'grpo'; valid names: gspo, pg, ppo"):
        policy_loss("grpo", lp, adv, mask)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['eps'\]; it accepts: clip_low, clip_high, dual"):
        policy_loss("ppo", lp, adv, mask, old_logprobs=old, eps=0.2)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss("ppo", lp, adv, mask, old_logprobs=old, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"advantages must have the shape of logprobs \(5, 6\), got \(5,\)"):
        policy_loss("pg", lp, adv[:, 0], mask)
    with pytest.raises(ValueError, match="unknown loss aggregation mode"):
        policy_loss("pg", lp, adv, mask, agg="sum")


def test_empty_batch_has_defined_loss_and_stats():
    zeros = torch.zeros(2, 3)
    loss, st = policy_loss("ppo", zeros, torch.ones(2, 3), zeros, old_logprobs=zeros, agg="seq-mean-token-mean")
    assert loss == 0 and st.clip_frac == 0 and st.approx_kl == 0 and st.num_tokens == 0
    assert (st.ratio_mean, st.ratio_min, st.ratio_max) == (1, 1, 1)
    vloss, vst = value_loss(zeros, torch.ones(2, 3), zeros)
    assert vloss == 0 and vst.mse == 0
