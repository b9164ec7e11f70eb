"""Training-time log-probs: against an unpadded per-row reference, entropy, hidden states, gradients."""

from __future__ import annotations

import pytest
import torch

from seqpg.batch import Prompt
from seqpg.model.policy import completion_logprobs, position_ids_from_mask
from seqpg.rollout.sampling import generate

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



# Shared-prompt layout: rows 0, 2, 3 share a prompt, rows 1 and 4 share another (uneven groups, mixed order).
SHARED_PROMPTS = [[10, 11, 12], [20, 21, 22, 23, 24, 25], [10, 11, 12], [10, 11, 12], [20, 21, 22, 23, 24, 25]]
SHARED_COMPLETIONS = [[40, 41, 42, 43], [50], [60, 61, 2], [70, 71, 72, 73], [80, 81]]


def padded_and_shared(model, batch, temperature=1.0, with_entropy=False, with_hidden=False):
    """(padded-layout output, shared-prompt-layout output) of the same batch."""
    from seqpg.model.policy import _padded_logprobs, _shared_prompt_logprobs, shared_prompt_groups

    groups = shared_prompt_groups(batch)
    args = (temperature, with_entropy, with_hidden)
    return _padded_logprobs(model, batch, *args), _shared_prompt_logprobs(model, batch, groups, *args)


def test_shared_prompt_groups_by_prompt_tokens(make_rollout):
    from seqpg.model.policy import shared_prompt_groups

    g = shared_prompt_groups(make_rollout(SHARED_PROMPTS, SHARED_COMPLETIONS))
    assert (g.num_groups, g.max_members) == (2, 3)
    assert g.group_B.tolist() == [0, 1, 0, 0, 1] and g.member_B.tolist() == [0, 0, 1, 2, 1]
    assert g.first_row_G.tolist() == [0, 1]
    assert shared_prompt_groups(make_rollout(PROMPT_TOKENS, COMPLETION_TOKENS)) is None
    # the same real tokens under different left padding are still one prompt
    assert shared_prompt_groups(make_rollout([[5, 6], [5, 6], [1, 2, 3]], [[7], [8], [9]])).num_groups == 2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_layout_equals_padded_layout(tiny_model_and_tokenizer, make_rollout, attn, temperature):
    model, _ = tiny_model_and_tokenizer
    model.config._attn_implementation = attn
    batch = make_rollout(SHARED_PROMPTS, SHARED_COMPLETIONS)
    with torch.no_grad():
        padded, shared = padded_and_shared(model, batch, temperature, with_entropy=True, with_hidden=True)
    torch.testing.assert_close(shared.logprobs_BC, padded.logprobs_BC, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.entropy_BC, padded.entropy_BC, atol=1e-5, rtol=1e-5)
    real_BC = batch.completion_mask_BC
    torch.testing.assert_close(shared.hidden_BCH[real_BC], padded.hidden_BCH[real_BC], atol=1e-5, rtol=1e-5)
    assert (shared.logprobs_BC[~real_BC] == 0).all() and (shared.entropy_BC[~real_BC] == 0).all()


def test_shared_prompt_layout_gradient_equals_padded_layout(tiny_model_and_tokenizer, make_rollout):
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout(SHARED_PROMPTS, SHARED_COMPLETIONS)
    weights = [model.model.layers[0].self_attn.q_proj.weight, model.model.embed_tokens.weight, model.lm_head.weight]
    grads = []
    for out in padded_and_shared(model, batch, with_entropy=True):
        model.zero_grad(set_to_none=True)
        (out.logprobs_BC.sum() + 0.1 * out.entropy_BC.sum()).backward()
        grads.append([w.grad.clone() for w in weights])
    for padded_grad, shared_grad in zip(*grads):
        assert padded_grad.abs().max() > 0
        torch.testing.assert_close(shared_grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_shared_prompt_layout_one_completion_column(tiny_model_and_tokenizer, make_rollout):
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout([[10, 11, 12]] * 3, [[40], [41], [2]])
    with torch.no_grad():
        padded, shared = padded_and_shared(model, batch, with_entropy=True)
    assert shared.logprobs_BC.shape == (3, 1)
    torch.testing.assert_close(shared.logprobs_BC, padded.logprobs_BC, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.entropy_BC, padded.entropy_BC, atol=1e-5, rtol=1e-5)


def test_shared_prompt_layout_runs_each_prompt_once(tiny_model_and_tokenizer, make_rollout):
    """The trunk sees one row per distinct prompt, no padding inside; the LM head only the columns that predict."""
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout(SHARED_PROMPTS, SHARED_COMPLETIONS)
    trunk, head = [], []
    model.model.embed_tokens.register_forward_hook(lambda _m, inputs, _o: trunk.append(tuple(inputs[0].shape)))
    model.lm_head.register_forward_hook(lambda _m, inputs, _o: head.append(tuple(inputs[0].shape)))
    completion_logprobs(model, batch)
    # group of rows 0, 2, 3: prompt of 3 + completions of 4, 3, 4 tokens less their last = 11 columns
    # group of rows 1, 4: prompt of 6 + 0 + 1 = 7 columns, padded to 11; kept: 1 + 8 and 1 + 1, padded to 9
    assert trunk == [(2, 11)] and head == [(2, 9, 32)]


def test_shared_prompt_layout_with_gradient_checkpointing(tiny_model_and_tokenizer, make_rollout):
    """Checkpointed layers recompute the packed rows under the same mask: same values and gradients."""
    model, _ = tiny_model_and_tokenizer
    batch = make_rollout(SHARED_PROMPTS, SHARED_COMPLETIONS)
    weight = model.model.layers[0].mlp.up_proj.weight
    grads, values = [], []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.zero_grad(set_to_none=True)
        out = completion_logprobs(model, batch)
        out.logprobs_BC.sum().backward()
        values.append(out.logprobs_BC.detach())
        grads.append(weight.grad.clone())
    torch.testing.assert_close(values[1], values[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# Segment attention: the shared-prompt layout's attention by blocks (seqpg.model.segment_attention).

def tiny_family(arch: str, vocab: int = 100) -> torch.nn.Module:
    """A seeded 2-layer decoder of ``arch`` with grouped-query attention (4 heads, 2 KV heads), on SDPA."""
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    torch.manual_seed(0)
    config = cls[0](vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, attn_implementation="sdpa")
    return cls[1](config).float().eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_segment_attention_serves_every_layer_and_equals_the_padded_layout(make_rollout, arch):
    """Each layer's attention goes through the blocks (so the test can fail), and the values and
    gradients are those of the padded layout."""
    from seqpg.model import segment_attention

    model = tiny_family(arch)
    assert segment_attention.applies(model)
    batch = make_rollout(SHARED_PROMPTS, SHARED_COMPLETIONS)
    served = []
    original = segment_attention.attention

    def spy(*args, seqpg_segments=None, **kwargs):
        served.append(seqpg_segments is not None)
        return original(*args, seqpg_segments=seqpg_segments, **kwargs)

    segment_attention.attention = spy
    try:
        outs = []
        for out in padded_and_shared(model, batch, with_entropy=True):
            model.zero_grad(set_to_none=True)
            (out.logprobs_BC.sum() + 0.1 * out.entropy_BC.sum()).backward()
            outs.append((out.logprobs_BC.detach(), [p.grad.clone() for p in model.parameters()]))
    finally:
        segment_attention.attention = original
    assert served == [True] * model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward
    (padded_lp, padded_grads), (shared_lp, shared_grads) = outs
    torch.testing.assert_close(shared_lp, padded_lp, atol=1e-5, rtol=1e-5)
    for g_shared, g_padded in zip(shared_grads, padded_grads):
        torch.testing.assert_close(g_shared, g_padded, atol=1e-5, rtol=1e-4)


def test_segment_attention_under_bf16_autocast_stays_close(make_rollout):
    model = tiny_family("llama")
    batch = make_rollout(SHARED_PROMPTS, SHARED_COMPLETIONS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        padded, shared = padded_and_shared(model, batch)
    torch.testing.assert_close(shared.logprobs_BC, padded.logprobs_BC, atol=5e-2, rtol=0)


def test_segment_attention_is_off_for_other_attention_and_checkpointing():
    from seqpg.model import segment_attention

    model = tiny_family("llama")
    model.config._attn_implementation = "eager"
    assert not segment_attention.applies(model)
    model.config._attn_implementation = "sdpa"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not segment_attention.applies(model)


def test_segment_layout_blocks():
    """Prompt 0 (3 tokens) with segments of 2 and 0 inputs; prompt 1 (2 tokens) with a segment of 1."""
    from seqpg.model.segment_attention import SegmentLayout

    L = 5
    lay = SegmentLayout.build(L, torch.tensor([3, 2]), torch.tensor([0, 0, 1]),
                              col_BS=torch.tensor([[3, 4], [0, 0], [2, 0]]),
                              in_seg_BS=torch.tensor([[True, True], [False, False], [True, False]]))
    assert lay.prompt_dest.tolist() == [0, 1, 2, 5, 6]
    assert lay.seg_dest.tolist() == [3, 4, 7]
    assert lay.seg_k_BK[2].tolist() == [5, 6, 7, 7, 5]  # prompt 1's columns (the third masked), then its segment
    assert lay.seg_allowed_B1SK[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert lay.seg_allowed_B1SK[2, 0, 0].tolist() == [True, True, False, True, False]
    assert lay.prompt_allowed_G1PP[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]


def test_segment_layout_moves_to_the_queries_device():
    from seqpg.model.segment_attention import SegmentLayout

    lay = SegmentLayout.build(5, torch.tensor([3, 2]), torch.tensor([0, 0, 1]),
                              col_BS=torch.tensor([[3, 4], [0, 0], [2, 0]]),
                              in_seg_BS=torch.tensor([[True, True], [False, False], [True, False]]))
    assert lay.on(torch.device("cpu")) is lay
    meta = lay.on(torch.device("meta"))
    assert meta.seg_k_BK.device.type == "meta" and meta.L == lay.L and lay.seg_k_BK.device.type == "cpu"
