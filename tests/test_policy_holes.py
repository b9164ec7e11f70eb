"""Multi-turn rows: the completion holds the model's turns AND the environment's tokens, so its action
mask has holes.  Every layout must feed the whole span (environment tokens are context) and give, at
the action positions, the log-probs of a plain forward over the row's real tokens."""

from __future__ import annotations

import pytest
import torch

from seqpg.model.policy import (_padded_logprobs, _shared_prompt_logprobs, completion_logprobs,
                                shared_prompt_groups)

# rows 0, 2, 3 share a prompt, rows 1 and 4 another; completions: model | env | model ... (1 = action)
PROMPTS = [[10, 11, 12], [20, 21, 22, 23, 24, 25], [10, 11, 12], [10, 11, 12], [20, 21, 22, 23, 24, 25]]
COMPLETIONS = [[40, 41, 90, 91, 92, 42, 43], [50, 93, 51], [60, 61, 2], [70, 94, 95, 71, 96, 72, 73], [80, 81, 97]]
ACTIONS = [[1, 1, 0, 0, 0, 1, 1], [1, 0, 1], [1, 1, 1], [1, 0, 0, 1, 0, 1, 1], [1, 1, 0]]  # row 4 ends on context


def holed(make_rollout):
    batch = make_rollout(PROMPTS, COMPLETIONS)
    for i, a in enumerate(ACTIONS):
        batch.completion_mask_BC[i, :len(a)] = torch.tensor(a, dtype=torch.bool)
    return batch


def reference(model, temperature=1.0):
    """Per row: (log-probs at every completion position, last hidden states before them) of a plain forward."""
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        res = model(input_ids=torch.tensor([p + c]), output_hidden_states=True)
        logp_TV = torch.log_softmax(res.logits[0, len(p) - 1:-1] / temperature, -1)
        out.append((logp_TV.gather(1, torch.tensor(c)[:, None])[:, 0], res.hidden_states[-1][0, len(p) - 1:-1]))
    return out


def test_span_mask_reaches_the_last_action(make_rollout):
    batch = holed(make_rollout)
    assert batch.span_mask_BC.long().tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1] * 7,
                                                  [1, 1, 0, 0, 0, 0, 0]]
    assert batch.completion_lengths_B.tolist() == [4, 2, 3, 4, 2] and batch.span_lengths_B.tolist() == [7, 3, 3, 7, 2]
    plain = make_rollout(PROMPTS, COMPLETIONS)
    assert torch.equal(plain.span_mask_BC, plain.completion_mask_BC)  # single-turn rows: the span is the mask


@pytest.mark.parametrize("layout", ["padded", "shared-dense", "shared-segments"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_holes_give_plain_forward_logprobs_at_actions(tiny_model_and_tokenizer, make_rollout, layout, temperature):
    from seqpg.model import segment_attention

    model, _ = tiny_model_and_tokenizer
    batch = holed(make_rollout)
    if layout == "shared-dense":
        model.config._attn_implementation = "eager"  # the dense 4D mask path
    assert segment_attention.applies(model) == (layout != "shared-dense")
    weight = model.model.layers[0].self_attn.q_proj.weight
    args = (temperature, False, True)
    out = (_padded_logprobs(model, batch, *args) if layout == "padded"
           else _shared_prompt_logprobs(model, batch, shared_prompt_groups(batch), *args))
    out.logprobs_BC.sum().backward()
    got_grad = weight.grad.clone()
    weight.grad = None
    want = reference(model, temperature)
    want_grad_loss = 0.0
    for i, (lp_T, h_TH) in enumerate(want):
        act_T = batch.completion_mask_BC[i, :len(lp_T)]
        torch.testing.assert_close(out.logprobs_BC[i, :len(lp_T)][act_T], lp_T[act_T].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.hidden_BCH[i, :len(lp_T)][act_T], h_TH[act_T].detach(), atol=1e-5, rtol=1e-5)
        assert (out.logprobs_BC[i][~batch.completion_mask_BC[i]] == 0).all()  # context positions: no log-prob
        want_grad_loss = want_grad_loss + lp_T[act_T].sum()
    want_grad_loss.backward()
    assert weight.grad.abs().max() > 0
    torch.testing.assert_close(got_grad, weight.grad, atol=1e-5, rtol=1e-4)


def test_dropping_the_context_would_be_caught(tiny_model_and_tokenizer, make_rollout):
    """Power check: the same rows with the environment's tokens masked out of attention give other log-probs."""
    model, _ = tiny_model_and_tokenizer
    batch = holed(make_rollout)
    with torch.no_grad():
        good = completion_logprobs(model, batch).logprobs_BC
        blind = model(input_ids=batch.input_ids_BL,
                      attention_mask=torch.cat([batch.prompt_mask_BP, batch.completion_mask_BC], 1).long()).logits
    lp = torch.log_softmax(blind[0, 3 + 5 - 1], -1)[42]  # row 0's action after the context (prompt padded to 6)
    assert not torch.isclose(lp, good[0, 5], atol=1e-4)


def test_critic_reads_the_span(tiny_model_and_tokenizer, make_rollout):
    """A separate critic's values at action positions are those of the trunk over the whole row."""
    from seqpg.training.critic import build_critic

    model, _ = tiny_model_and_tokenizer
    batch = holed(make_rollout)
    critic = build_critic(model, shared=False)
    with torch.no_grad():
        torch.nn.init.normal_(critic.module.head.linear.weight)
        values_BC = critic.values_of(batch)
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
            h_TH = critic.module.trunk(input_ids=torch.tensor([p + c])).last_hidden_state[0, len(p) - 1:-1]
            act_T = batch.completion_mask_BC[i, :len(c)]
            torch.testing.assert_close(values_BC[i, :len(c)][act_T], critic.module.head(h_TH[None])[0][act_T],
                                       atol=1e-5, rtol=1e-5)
            assert (values_BC[i][~batch.completion_mask_BC[i]] == 0).all()
