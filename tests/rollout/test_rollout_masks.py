"""Masks: the environment's tokens are context, never actions: no gradient flows through their
logits, and an episode's utility is the sum of its model turns' utilities."""

from __future__ import annotations

import os
import sys

import torch

from seqpg.batch import Prompt
from seqpg.core import compute_advantages, returns_to_go, token_contributions, utility
from seqpg.rollout.environments import EpisodeLimits
import seqpg.model.policy as policy_mod
from seqpg.model.policy import completion_logprobs
from seqpg.rollout.episodes import episodes_to_rollout
from seqpg.rollout.multiturn import sample_episodes

sys.path.insert(0, os.path.dirname(__file__))
from scripted import ENV_CALLS, CountdownEnv, eos_prone  # noqa: E402


def episodes(model, tok):
    eos_prone(model, tok.eos_token_id)
    eps = sample_episodes(model, tok, [Prompt("hi", "a"), Prompt("Add 2 and 3.", "b")], lambda: CountdownEnv(3), n=2,
                          limits=EpisodeLimits(max_turns=3, max_new_tokens=10, max_tokens=400),
                          generator=torch.Generator().manual_seed(0), **ENV_CALLS)
    return episodes_to_rollout(eps, tok.pad_token_id, n=2)


def utility_grads(model, batch, adv_BC, perturb_columns_BK=None):
    """d(sum_i U_i)/d(params) through the trainer's log-probs, with noise added to the kept logits at the
    given columns (the padded layout keeps C + 1 columns; column t predicts completion token t)."""
    handle = None
    if perturb_columns_BK is not None:
        noise = torch.randn(*perturb_columns_BK.shape, model.config.vocab_size,
                            generator=torch.Generator().manual_seed(1)) * 5.0

        def hook(_m, _i, logits):
            return logits + noise * perturb_columns_BK[..., None]
        handle = model.lm_head.register_forward_hook(hook)
    model.zero_grad()
    lp_BC = completion_logprobs(model, batch).logprobs_BC
    utility(lp_BC, adv_BC, batch.completion_mask_BC).sum().backward()
    if handle is not None:
        handle.remove()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_logits_at_environment_positions_change_no_gradient(tiny_model_and_tokenizer, monkeypatch):
    monkeypatch.setattr(policy_mod, "_takes_per_row_logits_to_keep", lambda: False)  # the padded layout
    model, tok = tiny_model_and_tokenizer
    batch = episodes(model, tok)
    act_BC = batch.completion_mask_BC
    B, C = act_BC.shape
    adv_BC, _ = compute_advantages("grpo", batch.env_rewards_BC + torch.randn(B, 1), act_BC,
                                   group_ids=batch.group_ids_B)
    # kept logits column t gives completion token t's log-prob: columns predicting a non-action token
    predicts_env_BK = torch.zeros((B, C + 1))
    predicts_env_BK[:, :C] = (~act_BC).float()
    predicts_act_BK = torch.zeros_like(predicts_env_BK)
    predicts_act_BK[:, :C] = act_BC.float()
    base = utility_grads(model, batch, adv_BC)
    assert base.abs().sum() > 0
    torch.testing.assert_close(utility_grads(model, batch, adv_BC, predicts_env_BK), base, atol=1e-6, rtol=1e-5)
    # power check: the same noise at the actions' columns does change the gradient
    assert (utility_grads(model, batch, adv_BC, predicts_act_BK) - base).abs().max() > 1e-3


def test_episode_utility_is_the_sum_over_its_turns(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = episodes(model, tok)
    adv_BC = torch.randn(batch.completion_ids_BC.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lp_BC = completion_logprobs(model, batch).logprobs_BC
    whole_B = utility(lp_BC, adv_BC, batch.completion_mask_BC)
    per_turn_B = sum(utility(lp_BC, adv_BC, batch.turn_BC == k) for k in range(int(batch.turn_BC.max()) + 1))
    torch.testing.assert_close(whole_B, per_turn_B)
    torch.testing.assert_close(token_contributions(lp_BC, adv_BC, batch.completion_mask_BC).contribution_BT.sum(1),
                               whole_B)
    assert (batch.turn_BC >= 0).eq(batch.completion_mask_BC).all()


def test_turn_rewards_flow_back_across_environment_tokens(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = episodes(model, tok)
    G_BC = returns_to_go(batch.env_rewards_BC, batch.completion_mask_BC, gamma=0.5)
    for i, ep in enumerate(batch.episodes):  # rewards 1, 2, 3 on turns 0, 1, 2; discount per model token
        r = {t.end - 1: t.reward for t in ep.turns}
        expected, acc = {}, 0.0
        for t in reversed([t for t, a in enumerate(ep.action_mask) if a]):
            acc = r.get(t, 0.0) + 0.5 * acc
            expected[t] = acc
        for t, g in expected.items():  # episode position t is completion column t - prompt_len
            assert abs(float(G_BC[i, t - ep.prompt_len]) - g) < 1e-5
        assert (G_BC[i][~batch.completion_mask_BC[i]] == 0).all()
