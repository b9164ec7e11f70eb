"""sampling.dtype: the sampler's products in bf16 or int8 while the model's weights stay float32."""

from __future__ import annotations

import pytest
import torch
from scripted import ENV_CALLS, CountdownEnv

from seqpg.batch import Prompt
from seqpg.model.policy import completion_logprobs
from seqpg.rollout import fastdecode
from seqpg.rollout.environments import EpisodeLimits
from seqpg.rollout.multiturn import sample_episodes
from seqpg.rollout.sampling import SampleSettings, SamplingArgs, generate

PROMPTS = [Prompt("a", "x"), Prompt("b", "What is 12 + 7? Answer briefly.")]


def _sample(model, tok, dtype, **kw):
    s = SampleSettings(max_new_tokens=8, dtype=dtype, **kw)
    return s.generate(model, tok, PROMPTS, n=3, generator=torch.Generator().manual_seed(3))


def _gap(model, batch) -> float:
    """max |sampler log-prob - float32 training log-prob| over the sampled tokens."""
    with torch.no_grad():
        train = completion_logprobs(model, batch).logprobs_BC
    return float(((batch.sample_logprobs_BC - train).abs() * batch.completion_mask_BC).max())


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_lower_precision_sampler_samples_close_to_float32_and_leaves_the_weights(tiny_model_and_tokenizer, dtype):
    model, tok = tiny_model_and_tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32, low = _sample(model, tok, None), _sample(model, tok, dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _gap(model, fp32) < 1e-4  # the float32 sampler is the trainer, to rounding
    assert 1e-4 < _gap(model, low) < 0.1  # measurably another precision, still the same policy
    assert torch.equal(low.completion_ids_BC[:, 0], fp32.completion_ids_BC[:, 0])  # same draws, close policy


def test_int8_products_run_on_quantised_weights(tiny_model_and_tokenizer, monkeypatch):
    """Every product of the decode step (q|k|v, o, gate|up, down per layer, and the LM head) is quantised, once."""
    model, tok = tiny_model_and_tokenizer
    real, shapes = fastdecode.quantize_int8, []
    monkeypatch.setattr(fastdecode, "quantize_int8", lambda w, b: shapes.append(tuple(w.shape)) or real(w, b))
    _sample(model, tok, "int8")
    assert len(shapes) == 4 * model.config.num_hidden_layers + 1
    assert shapes[-1] == tuple(model.lm_head.weight.shape)


def test_quantize_int8_rounds_each_output_channel_to_its_own_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=g) * torch.tensor([1.0, 10.0, 0.1, 1.0, 3.0, 0.01])[:, None]
    x = torch.randn(4, 16, generator=g)
    y = torch.ops.quantized.linear_dynamic(x, fastdecode.quantize_int8(w, None), True)
    exact = x @ w.T
    err = (y - exact).abs() / (x.abs().sum(1, keepdim=True) * w.abs().amax(1)[None, :])
    assert float(err.max()) < 0.02  # relative to each channel's own scale, small channels included


def test_int8_needs_the_fast_decoder(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="sampling.dtype=int8 runs in seqpg's fast decoder.*fast_decode=false"):
        generate(model, tok, PROMPTS, max_new_tokens=2, fast_decode=False, quantize="int8")
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        generate(model, tok, PROMPTS, max_new_tokens=2, quantize="int4")


def test_episodes_sample_on_int8_weights(tiny_model_and_tokenizer, monkeypatch):
    model, tok = tiny_model_and_tokenizer
    real, calls = fastdecode.quantize_int8, []
    monkeypatch.setattr(fastdecode, "quantize_int8", lambda w, b: calls.append(1) or real(w, b))
    kw = dict(n=2, limits=EpisodeLimits(max_turns=2, max_new_tokens=5, max_tokens=300), sampling=SamplingArgs())
    fp32 = sample_episodes(model, tok, PROMPTS, lambda: CountdownEnv(2), generator=torch.Generator().manual_seed(0),
                           **kw, **ENV_CALLS)
    assert not calls
    int8 = sample_episodes(model, tok, PROMPTS, lambda: CountdownEnv(2), generator=torch.Generator().manual_seed(0),
                           quantize="int8", **kw, **ENV_CALLS)
    assert len(calls) == 4 * model.config.num_hidden_layers + 1
    # a turn's first token comes from feeding its context (the model's precision), the next ones from int8 steps
    p = [ep.prompt_len for ep in fp32]
    assert p == [ep.prompt_len for ep in int8]
    assert all(a.sample_logprobs[k] == b.sample_logprobs[k] != 0 for a, b, k in zip(fp32, int8, p))
    second = [abs(a.sample_logprobs[k + 1] - b.sample_logprobs[k + 1]) for a, b, k in zip(fp32, int8, p)
              if a.token_ids[:k + 1] == b.token_ids[:k + 1] and a.action_mask[k + 1]]
    assert second and all(0 < d < 0.05 for d in second)
