"""Gemma 3 through the lean decode step (seqpg.rollout.fastdecode) and the training-time log-probs
(seqpg.model.policy), against the model's own forward, on a tiny random Gemma 3 built in-process.

The tiny model (``build_tiny_model(arch="gemma3")``) has 3 layers, two over a sliding window of
``TINY_SLIDING_WINDOW`` = 8 positions and one global, so every prompt and completion here runs past
the window; prompts of different lengths make the batches left-padded.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from seqpg.batch import Prompt
from seqpg.model.loading import TINY_SLIDING_WINDOW, build_tiny_model
from seqpg.model.policy import completion_logprobs, position_ids_from_mask
from seqpg.rollout import fastdecode, sampling
from seqpg.rollout.fastdecode import FastDecoder, supports
from seqpg.rollout.sampling import generate, preallocated_cache

PROMPTS = [Prompt("x", "a"), Prompt("What is 12 + 7? Answer briefly.", "b"), Prompt("hello there", "c")]


def gemma3(tokenizer, **config) -> torch.nn.Module:
    model = build_tiny_model(len(tokenizer), arch="gemma3", num_layers=3)
    for key, value in config.items():
        setattr(model.config, key, value)
    return model


def test_the_tiny_gemma3_has_what_the_decoder_must_repeat(tiny_tokenizer):
    model = gemma3(tiny_tokenizer)
    assert model.config.model_type == "gemma3_text" and supports(model)
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert model.model.embed_tokens.embed_scale.item() == pytest.approx(32 ** 0.5)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].post_feedforward_layernorm.weight.abs().min() > 0  # norms that would show


@pytest.mark.parametrize("cap", [None, 3.0], ids=["plain", "final-softcap"])
def test_gemma3_decode_logits_equal_a_full_forward_without_cache(tiny_tokenizer, cap):
    """Teacher-forced: at every step the fast decoder's (B, V) logits are those of the model's own
    forward over the whole left-padded sequence so far (no cache), to fp32 rounding, past the window."""
    model = gemma3(tiny_tokenizer, final_logit_softcapping=cap)
    lengths, T = [3, 13, 20], 14
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(4, len(tiny_tokenizer), (n + T,), generator=g) for n in lengths]
    P = max(lengths)
    ids_BL = torch.zeros((len(lengths), P + T), dtype=torch.long)
    mask_BL = torch.zeros((len(lengths), P + T), dtype=torch.bool)
    for i, (n, row) in enumerate(zip(lengths, tokens)):
        ids_BL[i, P - n:] = row
        mask_BL[i, P - n:] = True
    pos_BL = position_ids_from_mask(mask_BL)
    cache = preallocated_cache(model.config, P + T)
    with torch.no_grad():
        model.get_decoder()(input_ids=ids_BL[:, :P - 1], attention_mask=mask_BL[:, :P - 1].long(),
                            position_ids=pos_BL[:, :P - 1], use_cache=True, **{sampling.CACHE_KWARG: cache})
        fast = FastDecoder(model, cache, rows=len(lengths))
        for t in range(T + 1):
            w = P + t  # columns seen after this step
            got_BV = fast.step(ids_BL[:, w - 1:w], pos_BL[:, w - 1:w], mask_BL[:, :w])
            want_BV = model(input_ids=ids_BL[:, :w], attention_mask=mask_BL[:, :w].long(),
                            position_ids=pos_BL[:, :w], use_cache=False).logits[:, -1]
            torch.testing.assert_close(got_BV, want_BV, atol=1e-5, rtol=1e-5)
    assert P + T > 2 * TINY_SLIDING_WINDOW


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gemma3_fast_decode_samples_as_the_models_forward(tiny_tokenizer, temperature):
    """Same draws, same tokens, same log-probs as decoding through the model's forward, and they are the
    training-time log-probs of the same tokens (shared-prompt layout: 3 samples per prompt)."""
    model = gemma3(tiny_tokenizer)
    kw = dict(n=3, max_new_tokens=20, temperature=temperature)
    fast = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(1), **kw)
    slow = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(1), fast_decode=False,
                    **kw)
    assert fast.prompt_mask_BP.sum(1).min() > TINY_SLIDING_WINDOW  # every prompt already past the window
    assert (~fast.prompt_mask_BP).any()  # and the batch left-padded
    assert torch.equal(fast.completion_ids_BC, slow.completion_ids_BC)
    torch.testing.assert_close(fast.sample_logprobs_BC, slow.sample_logprobs_BC, atol=1e-5, rtol=0)
    train = completion_logprobs(model, fast, temperature=temperature).logprobs_BC
    torch.testing.assert_close(fast.sample_logprobs_BC, train * fast.completion_mask_BC, atol=1e-5, rtol=0)


def test_gemma3_fixed_buffer_step_equals_the_plain_step(tiny_tokenizer, monkeypatch):
    """The CUDA graph's step (attention over the whole capacity, unwritten columns masked), run eagerly:
    its sliding windows count written columns only, so it decodes as the plain step does."""
    model = gemma3(tiny_tokenizer)
    kw = dict(n=3, max_new_tokens=16, temperature=1.0, stop_strings=("e", "7"))
    plain = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    monkeypatch.setattr(sampling, "FastDecoder", partial(FastDecoder, graph=True))
    fixed = generate(model, tiny_tokenizer, PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(plain.completion_ids_BC, fixed.completion_ids_BC)
    torch.testing.assert_close(plain.sample_logprobs_BC, fixed.sample_logprobs_BC, atol=1e-5, rtol=0)


def test_a_sliding_window_counts_real_columns_only():
    """Window 2 over a row with masked columns inside (a multi-turn cache's padding): the two most recent
    real columns, wherever they are; a row with fewer real columns than the window sees them all."""
    attend_BW = torch.tensor([[True, True, False, True, False, True],
                              [False, False, False, False, True, True],
                              [False, False, False, False, False, True]])
    bias_BW = fastdecode._attention_bias(attend_BW, 2)[:, 0, 0]
    seen_BW = bias_BW == 0
    assert seen_BW.tolist() == [[False, False, False, True, False, True],
                                [False, False, False, False, True, True],
                                [False, False, False, False, False, True]]
    assert (fastdecode._attention_bias(attend_BW, None)[:, 0, 0] == 0).equal(attend_BW)


def test_gemma3_configs_the_step_does_not_repeat_use_the_models_forward(tiny_tokenizer):
    assert not supports(gemma3(tiny_tokenizer, attn_logit_softcapping=50.0))
    assert not supports(gemma3(tiny_tokenizer, use_bidirectional_attention=True))


def one_row_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of one row run alone, unpadded: the plain reference."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion)[:, None])[:, 0]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompt", "padded"])
def test_gemma3_training_logprobs_equal_each_row_alone(tiny_tokenizer, make_rollout, implementation, shared):
    """Both log-prob layouts on Gemma 3, completions running past the sliding window: each row's log-probs
    are those of the row run alone.  The shared-prompt layout packs a group's completions one after the
    other, so its sliding-window layers need their window counted in positions, not packed columns."""
    model = gemma3(tiny_tokenizer)
    model.config._attn_implementation = implementation
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 90, (n,), generator=g).tolist() for n in (5, 11)]
    rows = [0, 0, 0, 1, 1] if shared else [0, 1]
    completions = [torch.randint(4, 90, (n,), generator=g).tolist() for n in (12, 17, 9, 14, 20)[:len(rows)]]
    batch = make_rollout([prompts[r] for r in rows], completions, group_ids=rows)
    got_BC = completion_logprobs(model, batch).logprobs_BC.detach()
    for i, (r, c) in enumerate(zip(rows, completions)):
        torch.testing.assert_close(got_BC[i, :len(c)], one_row_logprobs(model, prompts[r], c), atol=1e-5, rtol=0)
    assert max(map(len, completions)) > 2 * TINY_SLIDING_WINDOW


def test_gemma3_fast_decode_under_bf16_autocast_stays_close(tiny_tokenizer):
    """bf16 sampling (autocast, products in bf16): the first step sees identical inputs on both paths."""
    model = gemma3(tiny_tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = generate(model, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=4, greedy=True)
        slow = generate(model, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=4, greedy=True, fast_decode=False)
    assert torch.equal(fast.completion_ids_BC[:, 0], slow.completion_ids_BC[:, 0])
    torch.testing.assert_close(fast.sample_logprobs_BC[:, 0], slow.sample_logprobs_BC[:, 0], atol=3e-2, rtol=0)
