"""Masks: the environment's tokens are context, never actions: no gradient flows through their
logits, and an episode's utility is the sum of its model turns' utilities."""

from __future__ import annotations

import os
import sys

import torch

from seqpg.batch import Prompt
from seqpg.core import compute_advantages, returns_to_go, token_contributions, utility
from seqpg.rollout.environments import EpisodeLimits
from seqpg.rollout.episodes import batch_episodes, episode_logprobs
from seqpg.rollout.multiturn import sample_episodes

sys.path.insert(0, os.path.dirname(__file__))
from scripted import CountdownEnv, eos_prone  # noqa: E402


def episodes(model, tok):
    eos_prone(model, tok.eos_token_id)
    eps = sample_episodes(model, tok, [Prompt("hi", "a"), Prompt("Add 2 and 3.", "b")], lambda: CountdownEnv(3), n=2,
                          limits=EpisodeLimits(max_turns=3, max_new_tokens=10, max_tokens=400),
                          generator=torch.Generator().manual_seed(0))
    return batch_episodes(eps, tok.pad_token_id)


def utility_grads(model, batch, adv_BL, perturb_columns_BL=None):
    """d(sum_i U_i)/d(params), with noise added to the logits at the given columns (predicting token t+1)."""
    handle = None
    if perturb_columns_BL is not None:
        noise = torch.randn(*perturb_columns_BL.shape, model.config.vocab_size,
                            generator=torch.Generator().manual_seed(1)) * 5.0

        def hook(_m, _i, logits):
            return logits + noise * perturb_columns_BL[..., None]
        handle = model.lm_head.register_forward_hook(hook)
    model.zero_grad()
    lp_BL, _ = episode_logprobs(model, batch)
    utility(lp_BL, adv_BL, batch.action_mask_BL).sum().backward()
    if handle is not None:
        handle.remove()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_logits_at_environment_positions_change_no_gradient(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = episodes(model, tok)
    act_BL = batch.action_mask_BL
    adv_BL, _ = compute_advantages("grpo", batch.rewards_BL + torch.randn(act_BL.shape[0], 1), act_BL,
                                   group_ids=batch.group_ids_B)
    # the logits at column t-1 give token t's log-prob: columns predicting a non-action token
    predicts_env_BL = torch.zeros_like(act_BL, dtype=torch.float32)
    predicts_env_BL[:, :-1] = (~act_BL[:, 1:]).float()
    predicts_act_BL = torch.zeros_like(predicts_env_BL)
    predicts_act_BL[:, :-1] = act_BL[:, 1:].float()
    base = utility_grads(model, batch, adv_BL)
    assert base.abs().sum() > 0
    torch.testing.assert_close(utility_grads(model, batch, adv_BL, predicts_env_BL), base, atol=1e-6, rtol=1e-5)
    # power check: the same noise at the actions' columns does change the gradient
    assert (utility_grads(model, batch, adv_BL, predicts_act_BL) - base).abs().max() > 1e-3


def test_episode_utility_is_the_sum_over_its_turns(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = episodes(model, tok)
    adv_BL = torch.randn(batch.ids_BL.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lp_BL, _ = episode_logprobs(model, batch)
    whole_B = utility(lp_BL, adv_BL, batch.action_mask_BL)
    per_turn_B = sum(utility(lp_BL, adv_BL, batch.turn_BL == k) for k in range(int(batch.turn_BL.max()) + 1))
    torch.testing.assert_close(whole_B, per_turn_B)
    torch.testing.assert_close(token_contributions(lp_BL, adv_BL, batch.action_mask_BL).contribution_BT.sum(1), whole_B)
    assert (batch.turn_BL >= 0).eq(batch.action_mask_BL).all()


def test_turn_rewards_flow_back_across_environment_tokens(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = episodes(model, tok)
    G_BL = returns_to_go(batch.rewards_BL, batch.action_mask_BL, gamma=0.5)
    for i, ep in enumerate(batch.episodes):  # rewards 1, 2, 3 on turns 0, 1, 2; discount per model token
        r = {t.end - 1: t.reward for t in ep.turns}
        expected, acc = {}, 0.0
        for t in reversed([t for t, a in enumerate(ep.action_mask) if a]):
            acc = r.get(t, 0.0) + 0.5 * acc
            expected[t] = acc
        for t, g in expected.items():
            assert abs(float(G_BL[i, t]) - g) < 1e-5
        assert (G_BL[i][~batch.action_mask_BL[i]] == 0).all()
