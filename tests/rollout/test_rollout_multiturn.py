"""The multi-turn sampler: KV extension equals recomputation, sampler log-probs equal trainer
log-probs on whole episodes, batching changes nothing, limits truncate, tools answer turns."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from seqpg.batch import Prompt
from seqpg.rollout.chat import decode_kept
from seqpg.rollout.environments import EpisodeLimits
from seqpg.model.policy import completion_logprobs
from seqpg.rollout.env_errors import EpisodeFailure
from seqpg.rollout.episodes import episodes_to_rollout
from seqpg.model.loading import TINY_SLIDING_WINDOW, build_tiny_model
from seqpg.rollout.fastdecode import supports
from seqpg.rollout.multiturn import KVRows, sample_episodes
from seqpg.rollout.tools import ToolStats, load_tools
from seqpg.rollout.sampling import SamplingArgs

sys.path.insert(0, os.path.dirname(__file__))
from scripted import ENV_CALLS, CountdownEnv, ScriptedModel, eos_prone  # noqa: E402

PROMPTS = [Prompt("hi", "short"), Prompt("What is 12 + 7? Answer briefly.", "long")]
LIMITS = EpisodeLimits(max_turns=3, max_new_tokens=12, max_tokens=400)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None]).logits[0]


@pytest.mark.parametrize("fast, capacity", [(True, 256), (False, 256), (True, 4)])
def test_kv_extension_equals_recomputation(tiny_model_and_tokenizer, fast, capacity):
    """Rows of different lengths extended by chunks of different lengths, decoded with holes, one row
    dropped: after each call every row's logits equal a fresh forward over its whole history; through the
    fast decoder or the model's forward, and with a cache that has to grow (capacity 4) on the way."""
    model, tok = tiny_model_and_tokenizer
    g = torch.Generator().manual_seed(0)
    hist = [torch.randint(4, 100, (n,), generator=g).tolist() for n in (3, 9, 6)]
    kv = KVRows(model, 3, tok.pad_token_id, capacity=capacity, fast_decode=fast)
    assert (kv.fast is not None) == fast  # the tiny Llama takes the fast decoder
    with torch.no_grad():
        logits = kv.extend(hist)
        for i in range(3):
            torch.testing.assert_close(logits[i], full_logits(model, hist[i])[-1], atol=1e-5, rtol=1e-5)
        for writing in ([True, True, True], [True, False, True], [False, True, False]):
            token = torch.randint(4, 100, (3,), generator=g)
            logits = kv.step(token, torch.tensor(writing))
            for i in range(3):
                if writing[i]:
                    hist[i].append(int(token[i]))
                    torch.testing.assert_close(logits[i], full_logits(model, hist[i])[-1], atol=1e-5, rtol=1e-5)
        kv.keep([2, 0])
        hist = [hist[2], hist[0]]
        deltas = [torch.randint(4, 100, (n,), generator=g).tolist() for n in (7, 2)]
        logits = kv.extend(deltas)
        for i in range(2):
            hist[i] += deltas[i]
            torch.testing.assert_close(logits[i], full_logits(model, hist[i])[-1], atol=1e-5, rtol=1e-5)
        for _ in range(3):  # steps after the drop and the second chunk
            token = torch.randint(4, 100, (2,), generator=g)
            logits = kv.step(token, torch.tensor([True, True]))
            for i in range(2):
                hist[i].append(int(token[i]))
                torch.testing.assert_close(logits[i], full_logits(model, hist[i])[-1], atol=1e-5, rtol=1e-5)
    layer = kv.cache.layers[0]
    assert layer.length == kv.attn_BW.shape[1] and layer.capacity >= layer.length
    assert (layer.capacity > capacity) == (capacity == 4)  # grew only where it had to


def test_fast_and_plain_decoding_sample_the_same_episodes(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    eos_prone(model, tok.eos_token_id)
    got = {fast: sample_episodes(model, tok, PROMPTS, lambda: CountdownEnv(3), n=2, limits=LIMITS,
                                 sampling=SamplingArgs(temperature=1.0), generator=seeded(3), fast_decode=fast,
                                 **ENV_CALLS)
           for fast in (True, False)}
    for a, b in zip(got[True], got[False]):
        assert a.token_ids == b.token_ids and a.action_mask == b.action_mask
        torch.testing.assert_close(torch.tensor(a.sample_logprobs), torch.tensor(b.sample_logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs(tiny_model_and_tokenizer, temperature):
    model, tok = tiny_model_and_tokenizer
    eos_prone(model, tok.eos_token_id)
    eps = sample_episodes(model, tok, PROMPTS, lambda: CountdownEnv(3), n=3, limits=LIMITS,
                          sampling=SamplingArgs(temperature=temperature), generator=seeded(0), **ENV_CALLS)
    batch = episodes_to_rollout(eps, tok.pad_token_id, n=3)
    turn_lens = {t.end - t.start for ep in eps for t in ep.turns}
    assert len(turn_lens) > 2 and all(len(ep.turns) == 3 and ep.done for ep in eps)
    with torch.no_grad():
        lp_BC = completion_logprobs(model, batch, temperature=temperature).logprobs_BC
    act = batch.completion_mask_BC
    torch.testing.assert_close(lp_BC[act], batch.sample_logprobs_BC[act], atol=1e-5, rtol=0)
    assert (lp_BC[~act] == 0).all() and (batch.sample_logprobs_BC[~act] == 0).all()
    assert batch.env_rewards_BC.sum(1).tolist() == [6.0] * 6  # rewards 1 + 2 + 3, one per turn's last token
    for i, ep in enumerate(eps):  # env tokens are context: the rendered observation is in the kept tokens
        text = decode_kept(tok, ep.token_ids)
        assert "<|im_start|>user\ntry again 1<|im_end|>\n<|im_start|>user" not in text
        assert "<|im_start|>user\ntry again 2<|im_end|>\n<|im_start|>assistant\n" in text
        assert batch.group_ids_B[i] == i // 3


def gemma3(tok, implementation="sdpa"):
    """The tiny Gemma 3: 3 layers, two of them over a sliding window of TINY_SLIDING_WINDOW positions."""
    model = build_tiny_model(len(tok), arch="gemma3", num_layers=3)
    model.config._attn_implementation = implementation
    return model


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths, shared", [((12, 5), 0), ((12, 10), 9)])
def test_gemma3_kv_extension_counts_the_window_in_positions(tiny_tokenizer, fast, implementation, lengths, shared):
    """Rows of 12 and 5 tokens, 6 decode steps with row 1 idle for 5 of them, then deltas of 3 and 10
    tokens (left padding inside the chunk): every row's cache has masked columns inside it, which a
    window counted in columns would count; the logits equal a fresh forward over each row's real tokens.
    ``shared``: the rows begin with that many equal tokens (more than the window), prefilled once
    (:mod:`seqpg.rollout.prefix`)."""
    model = gemma3(tiny_tokenizer, implementation)
    g = torch.Generator().manual_seed(0)
    hist = [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]
    hist[1][:shared] = hist[0][:shared]
    kv = KVRows(model, 2, tiny_tokenizer.pad_token_id, capacity=64, fast_decode=fast)
    assert (kv.fast is not None) == fast and kv.windowed
    with torch.no_grad():
        kv.extend(hist)
        assert (kv.prefilled < sum(lengths)) == (shared > 0)
        for s in range(6):
            writing, token = [True, s == 0], torch.randint(4, 100, (2,), generator=g)
            kv.step(token, torch.tensor(writing))
            hist = [h + [int(t)] if w else h for h, t, w in zip(hist, token, writing)]
        deltas = [torch.randint(4, 100, (n,), generator=g).tolist() for n in (3, 10)]
        logits = kv.extend(deltas)
    for i in range(2):
        hist[i] += deltas[i]
        assert len(hist[i]) > TINY_SLIDING_WINDOW
        torch.testing.assert_close(logits[i], full_logits(model, hist[i])[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hooked", [True, False])
def test_gemma3_sampler_logprobs_equal_trainer_logprobs_past_the_window(tiny_tokenizer, hooked):
    """Whole episodes on the tiny Gemma 3, far past its window, with idle rows (turns of varied lengths)
    and padded deltas in the cache.  ``hooked``: turns end on an EOS made likely by a hook on the LM head,
    so every step runs through the model's forward; else on stop strings, the steps through the fast decoder."""
    tok = tiny_tokenizer
    model = gemma3(tok)
    if hooked:
        eos_prone(model, tok.eos_token_id)
    assert supports(model) != hooked
    eps = sample_episodes(model, tok, PROMPTS, lambda: CountdownEnv(3), n=3, limits=LIMITS,
                          sampling=SamplingArgs(temperature=1.0), generator=seeded(0),
                          stop_strings=() if hooked else ("e", "a", "o", "t"), **ENV_CALLS)
    batch = episodes_to_rollout(eps, tok.pad_token_id, n=3)
    assert min(len(ep.token_ids) - ep.prompt_len for ep in eps) > 4 * TINY_SLIDING_WINDOW
    assert all(len(ep.turns) == 3 and ep.done for ep in eps)
    assert len({t.end - t.start for ep in eps for t in ep.turns}) > 2
    with torch.no_grad():
        lp_BC = completion_logprobs(model, batch, temperature=1.0).logprobs_BC
    act = batch.completion_mask_BC
    torch.testing.assert_close(lp_BC[act], batch.sample_logprobs_BC[act], atol=1e-5, rtol=0)


def test_batched_episodes_equal_each_alone(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    eos_prone(model, tok.eos_token_id)
    greedy = SamplingArgs(greedy=True)
    together = sample_episodes(model, tok, PROMPTS, lambda: CountdownEnv(2), limits=LIMITS, sampling=greedy,
                               **ENV_CALLS)
    for i, p in enumerate(PROMPTS):
        (alone,) = sample_episodes(model, tok, [p], lambda: CountdownEnv(2), limits=LIMITS, sampling=greedy,
                                   **ENV_CALLS)
        assert alone.token_ids == together[i].token_ids and alone.action_mask == together[i].action_mask
        torch.testing.assert_close(torch.tensor(alone.sample_logprobs), torch.tensor(together[i].sample_logprobs),
                                   atol=1e-5, rtol=0)


def test_turn_limit_and_token_budget_truncate(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    never_done = lambda: CountdownEnv(99)  # noqa: E731
    eps = sample_episodes(model, tok, PROMPTS, never_done, limits=EpisodeLimits(max_turns=2, max_new_tokens=5,
                                                                                 max_tokens=400), **ENV_CALLS)
    assert all(ep.truncated and not ep.done and len(ep.turns) == 2 for ep in eps)
    assert all(ep.action_mask[-1] for ep in eps)  # no observation after the last turn
    budget = 170
    eps = sample_episodes(model, tok, PROMPTS, never_done, limits=EpisodeLimits(max_turns=50, max_new_tokens=8,
                                                                                 max_tokens=budget), **ENV_CALLS)
    assert all(ep.truncated and len(ep.turns) > 1 and len(ep.token_ids) <= budget for ep in eps)
    with pytest.raises(ValueError, match="prompt 'short' is 99 tokens, no room under max_tokens=20"):
        sample_episodes(model, tok, PROMPTS, never_done,
                        limits=EpisodeLimits(max_turns=4, max_new_tokens=128, max_tokens=20), **ENV_CALLS)


def test_template_that_rewrites_history_is_refused(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    scripted = ScriptedModel(model, tok, ["  padded answer  "])
    with pytest.raises(EpisodeFailure, match="rendering the conversation changes text already in the context"):
        sample_episodes(scripted, tok, PROMPTS[:1], lambda: CountdownEnv(3), limits=LIMITS,
                        sampling=SamplingArgs(greedy=True), env_timeout_s=ENV_CALLS["env_timeout_s"],
                        on_env_error="raise")
    scripted = ScriptedModel(model, tok, ["  padded answer  "])
    [ep] = sample_episodes(scripted, tok, PROMPTS[:1], lambda: CountdownEnv(3), limits=LIMITS,
                           sampling=SamplingArgs(greedy=True), **ENV_CALLS)  # drop: that episode ends, the run goes on
    assert ep.truncated and not ep.done and "rewrites earlier turns" in ep.env_error and ep.turns[0].reward == 0


def test_tool_calls_answer_a_turn_then_the_environment_rewards(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    tools = load_tools(["tool_fixtures:add"])
    scripts = ['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>',
               '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>', "It is 5"]

    class AnswerEnv:
        def reset(self, prompt, seed):
            return "What is 2 + 3?"

        def step(self, text):
            return None, float("5" in text), True, {}

    stats = ToolStats()
    (ep,) = sample_episodes(ScriptedModel(model, tok, scripts), tok, [Prompt("q", "q")], AnswerEnv, tools=tools,
                            tool_stats=stats, limits=EpisodeLimits(max_turns=4, max_new_tokens=80, max_tokens=2000),
                            sampling=SamplingArgs(greedy=True), **ENV_CALLS)
    assert [t.text for t in ep.turns] == scripts and ep.done and not ep.truncated
    assert [t.reward for t in ep.turns] == [0.0, 0.0, 1.0]
    assert ep.turns[0].tool_results[0].content == "5" and ep.turns[1].tool_results[0].error == "bad_arguments"
    assert stats.calls == 2 and dict(stats.errors) == {"bad_arguments": 1}
    text = decode_kept(tok, ep.token_ids)
    assert "You may call these tools" in text  # the tiny template has no tools=: described in the system message
    assert "</tool_call><|im_end|>\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n" in text
    batch = episodes_to_rollout([ep], tok.pad_token_id, n=1)
    tool_pos = text.index("<|im_start|>tool")  # char-level tokenizer: special tokens are one char of text apart
    p = ep.prompt_len  # episode position t is completion column t - p
    assert not batch.completion_mask_BC[0, ep.turns[0].end - p:ep.turns[1].start - p].any()
    assert batch.env_rewards_BC[0, ep.turns[2].end - 1 - p] == 1.0 and tool_pos > 0
