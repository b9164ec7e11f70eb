"""U = sum_t log pi * A by hand, per-token contributions, and one descent step on a softmax policy."""

from __future__ import annotations

import pytest
import torch

from seqpg import policy_loss, token_contributions, token_logprobs, utility


def test_hand_computed_utility():
    lp = torch.tensor([[-3.0, -1.2, -0.7]])
    adv = torch.tensor([[4.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    tc = token_contributions(lp, adv, mask)
    torch.testing.assert_close(tc.contribution_BT, torch.tensor([[-12.0, -2.4, 0.0]]))
    torch.testing.assert_close(utility(lp, adv, mask), torch.tensor([-14.4]))


def test_directions():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -0.1], [-1.0, -1.0, -1.0, -1.0]])
    adv = torch.tensor([[1.5, -0.5, 0.0, 2.0], [-1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    tc = token_contributions(lp, adv, mask)
    assert tc.direction_BT.dtype == torch.int8
    assert tc.direction_BT.tolist() == [[1, -1, 0, 0], [-1, 1, 0, 0]]
    assert (tc.logprob_BT[~mask] == 0).all() and (tc.advantage_BT[~mask] == 0).all()
    assert not tc.contribution_BT.requires_grad


def test_utility_is_differentiable_in_logprobs_only():
    lp = torch.tensor([[-3.0, -1.2]], requires_grad=True)
    adv = torch.tensor([[4.0, 2.0]], requires_grad=True)
    utility(lp, adv, torch.ones(1, 2)).sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[4.0, 2.0]]))
    assert adv.grad is None


def test_one_descent_step_moves_probabilities_along_the_advantage():
    """Softmax policy over 3 tokens: token 0 gets A = +1, token 1 gets A = -1; one SGD step on L = -U."""
    z = torch.zeros(1, 1, 3)
    logits = z.expand(2, 1, 3).clone().requires_grad_()
    tokens = torch.tensor([[0], [1]])
    adv = torch.tensor([[1.0], [-1.0]])
    loss, _ = policy_loss("pg", token_logprobs(logits, tokens), adv, torch.ones(2, 1))
    loss.backward()
    p_before = torch.softmax(z[0, 0], 0)
    p_after = torch.softmax(z[0, 0] - 0.5 * logits.grad.sum(0)[0], 0)
    assert p_after[0] > p_before[0] and p_after[1] < p_before[1]
    direction = token_contributions(token_logprobs(logits, tokens), adv, torch.ones(2, 1)).direction_BT
    assert direction.flatten().tolist() == [1, -1]
    # the same step on +U does the opposite
    p_wrong = torch.softmax(z[0, 0] + 0.5 * logits.grad.sum(0)[0], 0)
    assert p_wrong[0] < p_before[0] and p_wrong[1] > p_before[1]


def test_door_checks():
    with pytest.raises(ValueError, match=r"advantages_BT must have the shape of logprobs_BT \(1, 2\), got \(2,\)"):
        utility(torch.zeros(1, 2), torch.zeros(2), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"logprobs_BT must have shape \(B, T\)"):
        token_contributions(torch.zeros(2), torch.zeros(2), torch.ones(2))
