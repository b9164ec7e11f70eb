"""Training-time log-probs: against an unpadded per-row reference, entropy, hidden states, gradients."""

from __future__ import annotations

import pytest
import torch

from seqpg.batch import Prompt
from seqpg.policy import completion_logprobs, position_ids_from_mask
from seqpg.sampling import generate

# Prompts of 3, 6 and 1 tokens; completions of 4, 1 and 3 tokens (ids 4.. are characters).
PROMPT_TOKENS = [[10, 11, 12], [20, 21, 22, 23, 24, 25], [30]]
COMPLETION_TOKENS = [[40, 41, 42, 43], [50], [60, 61, 2]]


def unpadded_reference(model, prompt: list[int], completion: list[int], temperature: float):
    """(logprobs_T, entropy_T, hidden_TH) of one row, from a full forward over its real tokens only."""
    ids_1L = torch.tensor([prompt + completion])
    with torch.no_grad():
        out = model(input_ids=ids_1L, output_hidden_states=True)
    P, T = len(prompt), len(completion)
    logp_TV = torch.log_softmax(out.logits[0, P - 1:P + T - 1] / temperature, dim=-1)
    entropy_T = -(logp_TV.exp() * logp_TV).sum(-1)
    return logp_TV.gather(1, torch.tensor(completion)[:, None]).squeeze(1), entropy_T, \
        out.hidden_states[-1][0, P - 1:P + T - 1]


def test_position_ids_count_real_tokens_only():
    mask_BL = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert position_ids_from_mask(mask_BL).tolist() == [[0, 0, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_unpadded_forward_row_by_row(tiny_model_and_tokenizer, make_rollout, temperature):
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)
    with torch.no_grad():
        out = completion_logprobs(model, batch, temperature=temperature, with_entropy=True, with_hidden=True)
    assert out.logprobs_BC.shape == (3, 4) and out.entropy_BC.shape == (3, 4) and out.hidden_BCH.shape == (3, 4, 32)
    for i, (p, c) in enumerate(zip(PROMPT_TOKENS, COMPLETION_TOKENS)):
        logp_T, ent_T, hidden_TH = unpadded_reference(model, p, c, temperature)
        T = len(c)
        torch.testing.assert_close(out.logprobs_BC[i, :T], logp_T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.entropy_BC[i, :T], ent_T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.hidden_BCH[i, :T], hidden_TH, atol=1e-5, rtol=1e-5)
        assert (out.logprobs_BC[i, T:] == 0).all() and (out.entropy_BC[i, T:] == 0).all()


def test_logits_only_for_completion_positions(tiny_model_and_tokenizer, make_rollout):
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)
    seen = []
    model.lm_head.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    completion_logprobs(model, batch)
    assert seen == [(3, 4 + 1, 32)]  # C + 1 positions, not P + C = 10


def test_gradient_matches_unpadded_rows(tiny_model_and_tokenizer, make_rollout):
    """d(sum of log-probs)/d(weights) of the padded batch = sum over rows of each unpadded row's gradient."""
    model, _ = tiny_model_and_tokenizer
    weight = model.model.layers[0].self_attn.q_proj.weight
    completion_logprobs(model, make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)).logprobs_BC.sum().backward()
    batched_grad = weight.grad.clone()
    weight.grad = None
    for p, c in zip(PROMPT_TOKENS, COMPLETION_TOKENS):
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
        torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).sum().backward()
    assert batched_grad.abs().max() > 0
    torch.testing.assert_close(batched_grad, weight.grad, atol=1e-5, rtol=1e-4)


def test_backward_through_a_sampled_batch(tiny_model_and_tokenizer):
    """The sampler runs under inference_mode; its tensors must still be usable in a training graph."""
    model, tok = tiny_model_and_tokenizer
    batch = generate(model, tok, [Prompt("hi", "a")], n=2, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    out = completion_logprobs(model, batch)
    ratio_BC = torch.exp(out.logprobs_BC - batch.sample_logprobs_BC)
    (ratio_BC * batch.sample_logprobs_BC).sum().backward()  # saves sample_logprobs_BC for backward
    assert model.model.embed_tokens.weight.grad is not None


def test_rejects_non_positive_temperature(tiny_model_and_tokenizer, make_rollout):
    model, _ = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS), temperature=0.0)
