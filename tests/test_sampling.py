"""The KV-cache sampler: log-probs, cache exactness, padding, stopping, seeding, templates."""

from __future__ import annotations

import pytest
import torch

from seqpg.batch import Prompt
from seqpg.model.policy import completion_logprobs, position_ids_from_mask
from seqpg.rollout.prefix import common_prefix
from seqpg.rollout.sampling import SamplingArgs, choose_tokens, encode_prompt, filter_top_k_top_p, generate

PROMPTS = [Prompt("hi", "short"), Prompt("What is 12 + 7? Answer briefly.", "long")]


def make_eos_prone(model, eos_id: int, bonus: float = 3.0):
    """Add ``bonus`` to the EOS logit (a hook on the LM head) so rows stop at varied lengths."""
    def hook(_module, _inputs, logits):
        return logits + bonus * torch.nn.functional.one_hot(torch.tensor(eos_id), logits.shape[-1])
    model.lm_head.register_forward_hook(hook)
    return model


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_logprobs_equal_completion_logprobs(tiny_model_and_tokenizer, temperature):
    model, tok = tiny_model_and_tokenizer
    make_eos_prone(model, tok.eos_token_id)
    batch = generate(model, tok, PROMPTS, n=4, max_new_tokens=16, temperature=temperature, generator=seeded(0))
    lengths = batch.completion_lengths_B
    assert lengths.min() < lengths.max(), "want rows of different lengths to cover right padding"
    with torch.no_grad():
        logprobs_BC = completion_logprobs(model, batch, temperature=temperature).logprobs_BC
    torch.testing.assert_close(batch.sample_logprobs_BC, logprobs_BC, atol=1e-5, rtol=0)
    assert (batch.sample_logprobs_BC[~batch.completion_mask_BC] == 0).all()


def test_cached_decoding_equals_full_recomputation(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    step_logits = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: step_logits.append(out[:, -1].clone()))
    batch = generate(model, tok, PROMPTS, n=2, max_new_tokens=12, generator=seeded(1))
    hooked_BCV = torch.stack(step_logits, dim=1)  # (B, C, V) logits the sampler saw at each step
    P, C = batch.prompt_ids_BP.shape[1], batch.completion_ids_BC.shape[1]
    mask_BL = batch.attention_mask_BL
    with torch.no_grad():
        full_BLV = model(input_ids=batch.input_ids_BL, attention_mask=mask_BL.long(),
                         position_ids=position_ids_from_mask(mask_BL)).logits
    real_BC = batch.completion_mask_BC
    assert hooked_BCV.shape[1] == C
    torch.testing.assert_close(hooked_BCV[real_BC], full_BLV[:, P - 1:P + C - 1][real_BC], atol=1e-5, rtol=1e-5)


def test_same_seed_same_samples_other_seed_other_samples(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    a = generate(model, tok, PROMPTS, n=3, max_new_tokens=10, generator=seeded(7))
    b = generate(model, tok, PROMPTS, n=3, max_new_tokens=10, generator=seeded(7))
    c = generate(model, tok, PROMPTS, n=3, max_new_tokens=10, generator=seeded(8))
    assert torch.equal(a.completion_ids_BC, b.completion_ids_BC)
    assert a.completions == b.completions
    assert not torch.equal(a.completion_ids_BC, c.completion_ids_BC)


def test_left_padded_batch_equals_each_prompt_alone(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = generate(model, tok, PROMPTS, greedy=True, max_new_tokens=12)
    assert batch.prompt_mask_BP.sum(1).unique().numel() == 2  # two different prompt lengths
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, tok, [prompt], greedy=True, max_new_tokens=12)
        C = alone.completion_ids_BC.shape[1]
        assert torch.equal(batch.completion_ids_BC[i, :C], alone.completion_ids_BC[0])
        assert batch.completions[i] == alone.completions[0]
        torch.testing.assert_close(batch.sample_logprobs_BC[i, :C], alone.sample_logprobs_BC[0], atol=1e-5, rtol=0)


def test_n_samples_repeat_prompts_and_number_groups(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = generate(model, tok, PROMPTS, n=3, max_new_tokens=4, generator=seeded(0))
    assert [p.id for p in batch.prompts] == ["short"] * 3 + ["long"] * 3
    assert batch.group_ids_B.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(batch.prompt_ids_BP[0], batch.prompt_ids_BP[2])
    assert not torch.equal(batch.prompt_ids_BP[0], batch.prompt_ids_BP[3])


def test_eos_ends_row_and_pads_after(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    make_eos_prone(model, tok.eos_token_id)
    batch = generate(model, tok, PROMPTS, n=4, max_new_tokens=10, generator=seeded(3))
    ids_BC, mask_BC = batch.completion_ids_BC, batch.completion_mask_BC
    is_eos_BC = (ids_BC == tok.eos_token_id) & mask_BC
    assert is_eos_BC.any() and not batch.finished_B.all(), "want rows that end on EOS and rows that run out"
    for i in range(batch.batch_size):
        L = int(mask_BC[i].sum())
        assert mask_BC[i, :L].all() and not mask_BC[i, L:].any()
        assert bool(batch.finished_B[i]) == bool(is_eos_BC[i].any())
        if batch.finished_B[i]:
            assert ids_BC[i, L - 1] == tok.eos_token_id and is_eos_BC[i].sum() == 1  # EOS is the last real token
            assert (ids_BC[i, L:] == tok.pad_token_id).all() and (batch.sample_logprobs_BC[i, L:] == 0).all()
            assert "<|im_end|>" not in batch.completions[i]
        else:
            assert L == 10
        assert batch.completions[i] == tok.decode(ids_BC[i, :L], skip_special_tokens=True)


def test_stop_string_cuts_text_keeps_completing_token(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    free = generate(model, tok, PROMPTS[:1], greedy=True, max_new_tokens=16)
    text = free.completions[0]
    stop = text[5:7]  # first occurrence may be earlier than index 5
    cut = text.find(stop)
    stopped = generate(model, tok, PROMPTS[:1], greedy=True, max_new_tokens=16, stop_strings=(stop, "never seen"))
    assert stopped.completions == [text[:cut]]
    assert bool(stopped.finished_B[0])
    n_tokens = cut + len(stop)  # character-level tokenizer: one token per character
    assert stopped.completion_ids_BC.shape[1] == n_tokens  # the only row stopped, so the loop did too
    assert stopped.completion_mask_BC[0].all()
    assert torch.equal(stopped.completion_ids_BC[0], free.completion_ids_BC[0, :n_tokens])


def test_top_k_one_equals_greedy(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    greedy = generate(model, tok, PROMPTS, n=2, greedy=True, max_new_tokens=10)
    top1 = generate(model, tok, PROMPTS, n=2, top_k=1, max_new_tokens=10, generator=seeded(5))
    assert torch.equal(greedy.completion_ids_BC, top1.completion_ids_BC)
    torch.testing.assert_close(greedy.sample_logprobs_BC, top1.sample_logprobs_BC)


def test_filter_top_k_top_p_by_hand():
    logits_BV = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    inf = float("-inf")
    keep = lambda k, p: (filter_top_k_top_p(logits_BV, k, p) != inf).tolist()[0]  # noqa: E731
    assert keep(0, 1.0) == [True, True, True, True]
    assert keep(2, 1.0) == [True, True, False, False]
    assert keep(0, 0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8: the nucleus is complete
    assert keep(0, 0.81) == [True, True, True, False]
    assert keep(0, 0.1) == [True, False, False, False]
    assert keep(1, 0.99) == [True, False, False, False]
    shuffled = filter_top_k_top_p(logits_BV[:, [2, 0, 3, 1]], 0, 0.8)
    assert (shuffled != inf).tolist()[0] == [False, True, False, True]


def test_choose_tokens_frequencies_and_recorded_logprob():
    probs_V = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits_BV = probs_V.log().expand(40000, 4)
    tokens_B, logprob_B = choose_tokens(logits_BV, SamplingArgs(top_p=0.8), seeded(0))
    freq_V = torch.bincount(tokens_B, minlength=4).float() / 40000
    torch.testing.assert_close(freq_V, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(logprob_B, probs_V.log()[tokens_B])  # untruncated, untempered
    _, logprob_B = choose_tokens(logits_BV[:1], SamplingArgs(temperature=0.5, greedy=True))
    torch.testing.assert_close(logprob_B, (probs_V ** 2 / (probs_V ** 2).sum()).log()[:1])


def test_chat_template_applied(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(encode_prompt(tok, "hi")) == expected
    custom = tok.decode(encode_prompt(tok, "hi", system_prompt="Be terse."))
    assert custom.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi")
    assert tok.decode(encode_prompt(tok, "hi", chat_template=False)) == "hi"
    batch = generate(model, tok, PROMPTS[:1], max_new_tokens=2, generator=seeded(0))
    assert tok.decode(batch.prompt_ids_BP[0][batch.prompt_mask_BP[0]]) == expected
    raw = generate(model, tok, PROMPTS[:1], max_new_tokens=2, chat_template=False, generator=seeded(0))
    assert raw.prompt_ids_BP.shape[1] == 2


def test_generate_restores_training_mode_and_rejects_bad_args(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    model.train()
    generate(model, tok, PROMPTS[:1], max_new_tokens=2, generator=seeded(0))
    assert model.training
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, PROMPTS, max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, PROMPTS, max_new_tokens=4, top_p=0.0)


def test_lora_model_samples_with_matching_logprobs(tiny_model_and_tokenizer):
    from seqpg.model.loading import LoraArgs, apply_lora

    model, tok = tiny_model_and_tokenizer
    model = apply_lora(model, LoraArgs(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=seeded(0))
    batch = generate(model, tok, PROMPTS, n=2, max_new_tokens=8, generator=seeded(0))
    with torch.no_grad():
        logprobs_BC = completion_logprobs(model, batch).logprobs_BC
    torch.testing.assert_close(batch.sample_logprobs_BC, logprobs_BC, atol=1e-5, rtol=0)


@pytest.mark.real_model
def test_real_smollm2_greedy_answer_and_logprobs():
    from seqpg.model.loading import load_model_and_tokenizer, resolve_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tok = load_model_and_tokenizer(resolve_model("smollm2-135m-instruct"))
    prompts = [Prompt("What is 12 + 7?", "add"), Prompt("Name a colour.", "colour")]
    # With the template's default system prompt ("...named SmolLM...") this checkpoint answers "= 9".
    greedy = generate(model, tok, prompts[:1], greedy=True, max_new_tokens=12,
                      system_prompt="You are a helpful assistant.")
    assert "12 + 7 = 19" in greedy.completions[0]
    batch = generate(model, tok, prompts, n=2, max_new_tokens=16, generator=seeded(0))
    with torch.no_grad():
        logprobs_BC = completion_logprobs(model, batch).logprobs_BC
    torch.testing.assert_close(batch.sample_logprobs_BC, logprobs_BC, atol=1e-4, rtol=0)


def test_one_token_prompt_beside_longer_ones(tiny_model_and_tokenizer):
    """A prompt of one token has nothing to prefill; batched with longer ones it still decodes as alone."""
    model, tok = tiny_model_and_tokenizer
    prompts = [Prompt("h", "one"), Prompt("hello there", "long")]
    batch = generate(model, tok, prompts, greedy=True, max_new_tokens=6, chat_template=False)
    assert batch.prompt_mask_BP.sum(1).tolist() == [1, 11]
    for i, prompt in enumerate(prompts):
        alone = generate(model, tok, [prompt], greedy=True, max_new_tokens=6, chat_template=False)
        C = alone.completion_ids_BC.shape[1]
        assert torch.equal(batch.completion_ids_BC[i, :C], alone.completion_ids_BC[0])
        torch.testing.assert_close(batch.sample_logprobs_BC[i, :C], alone.sample_logprobs_BC[0], atol=1e-5, rtol=0)
    with torch.no_grad():
        logprobs_BC = completion_logprobs(model, batch).logprobs_BC
    torch.testing.assert_close(batch.sample_logprobs_BC, logprobs_BC, atol=1e-5, rtol=0)


def test_prompts_prefilled_once_each(tiny_model_and_tokenizer):
    """The trunk sees the G prompts' common prefix once, then the G prompts once (their columns after it,
    all but the last), then B = G * n rows per step."""
    model, tok = tiny_model_and_tokenizer
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    batch = generate(model, tok, PROMPTS, n=3, max_new_tokens=4, generator=seeded(0))
    P, C = batch.prompt_ids_BP.shape[1], batch.completion_ids_BC.shape[1]
    L = common_prefix([ids[mask].tolist() for ids, mask in zip(batch.prompt_ids_BP[::3], batch.prompt_mask_BP[::3])])
    assert tok.decode(batch.prompt_ids_BP[-1, -P:][batch.prompt_mask_BP[-1]][:L]).endswith("<|im_start|>user\n")
    assert seen == [(1, L), (2, P - 1 - L)] + [(6, 1)] * C
