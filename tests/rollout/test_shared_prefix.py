"""Shared prompt prefixes prefilled once (seqpg.rollout.prefix): the multi-turn sampler's first inputs and
single-turn prompts sample exactly what they sampled with every row prefilled in full, on the tiny Llama
and the tiny Gemma 3 (its sliding window shorter than the shared prefix), rows of different lengths."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from seqpg.batch import Prompt
from seqpg.model.loading import TINY_SLIDING_WINDOW, build_tiny_model
from seqpg.rollout import sampling
from seqpg.rollout.environments import EpisodeLimits
from seqpg.rollout.multiturn import KVRows, sample_episodes
from seqpg.rollout.prefix import PrefillCount, common_prefix
from seqpg.rollout.sampling import SamplingArgs, generate, preallocated_cache
from seqpg.rollout.tools import load_tools

sys.path.insert(0, os.path.dirname(__file__))
from scripted import ENV_CALLS, CountdownEnv, eos_prone  # noqa: E402

SYSTEM = "You answer questions about arithmetic, briefly, and call the add tool when a sum is asked for."
PROMPTS = [Prompt("hi", "short"), Prompt("What is 12 + 7? Answer briefly.", "long"), Prompt("2+2?", "mid")]
LIMITS = EpisodeLimits(max_turns=2, max_new_tokens=10, max_tokens=1000)


def tiny(tokenizer, arch: str) -> torch.nn.Module:
    return build_tiny_model(len(tokenizer), arch=arch, num_layers=3 if arch == "gemma3" else 2)


def plain_start(self, first_ids):
    """The first chunk as before the shared prefill: every row's first input through the model in full."""
    ids_BD, real_BD, pos_BD = self._chunk(first_ids)
    self.prefilled = int(real_BD.sum())
    return self._forward(ids_BD, real_BD, pos_BD)


def trunk_calls(model) -> list[tuple[int, int]]:
    """The (rows, columns) of every forward through the model's embedding from now on."""
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape)))
    return seen


def test_common_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2], [1, 2]]) == 2 and common_prefix([[1], [2]]) == 0 and common_prefix([]) == 0


def test_spread_rows_shifts_the_one_row_into_each_row():
    cache = preallocated_cache(build_tiny_model(8).config, 6)
    layer = cache.layers[0]
    keys = torch.arange(1.0, 5.0).view(1, 1, 4, 1).expand(1, 2, 4, 3)  # (1, H, L=4, D): column c holds c + 1
    layer.update(keys, -keys)
    layer.spread_rows(torch.tensor([0, 2, 4]))
    assert layer.keys.shape == (3, 2, 4, 3) and layer.get_seq_length() == 4 and layer.capacity == 6
    assert layer.keys[:, 0, :, 0].tolist() == [[1, 2, 3, 4], [0, 0, 1, 2], [0, 0, 0, 0]]
    assert torch.equal(layer.values, -layer.keys)
    assert layer._keys[:, :, 4:].abs().sum() == 0  # the unwritten capacity stays zero


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kv_rows_first_inputs_shared_equal_each_in_full(tiny_tokenizer, arch, monkeypatch):
    """First inputs sharing a prefix longer than Gemma 3's window, two of them identical, one so short that
    its left padding covers the whole prefix: the logits after the first inputs, after decode steps and after
    a second chunk equal those of the plain prefill; the prefix went through the model once."""
    model = tiny(tiny_tokenizer, arch)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(4, 90, (3 * TINY_SLIDING_WINDOW,), generator=g).tolist()
    tails = [torch.randint(4, 90, (n,), generator=g).tolist() for n in (1, 30, 5)]
    first = [prefix + tails[0], prefix + tails[1], prefix + tails[2], prefix + tails[1]]
    steps = [torch.randint(4, 90, (4,), generator=g) for _ in range(3)]
    writing = [torch.tensor(w) for w in ([True] * 4, [True, False, True, True], [False, True, True, True])]
    deltas = [torch.randint(4, 90, (n,), generator=g).tolist() for n in (2, 9, 1, 4)]

    def run(kv):
        with torch.no_grad():
            out = [kv.extend(first)] + [kv.step(t, w) for t, w in zip(steps, writing)] + [kv.extend(deltas)]
            return out + [kv.step(steps[0], writing[0])]

    seen = trunk_calls(model)
    shared = run(KVRows(model, 4, tiny_tokenizer.pad_token_id, capacity=64))
    # the distinct rows' prefix (all but the last column) once, then their remainders; 3 distinct rows of 4
    assert seen[:2] == [(1, len(prefix)), (3, len(tails[1]))]
    monkeypatch.setattr(KVRows, "_start", plain_start)
    plain = run(KVRows(model, 4, tiny_tokenizer.pad_token_id, capacity=64))
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_episodes_sampled_with_shared_first_inputs_equal_those_without(tiny_tokenizer, arch, monkeypatch):
    """Episodes with a system message and a tool schema, three prompts of different lengths, three samples
    each: the same tokens and log-probs (fixed generator) with the shared prefill as with each episode's
    first input prefilled in full; with it the model computed the step's first inputs' shared part once."""
    model = eos_prone(tiny(tiny_tokenizer, arch), tiny_tokenizer.eos_token_id)
    tools = load_tools(["tool_fixtures:add"])

    def sample(count):
        return sample_episodes(model, tiny_tokenizer, PROMPTS, lambda: CountdownEnv(2), n=3, limits=LIMITS,
                               sampling=SamplingArgs(temperature=1.0), tools=tools, system_prompt=SYSTEM,
                               generator=torch.Generator().manual_seed(4), prefill=count, **ENV_CALLS)

    seen, counts = trunk_calls(model), (PrefillCount(), PrefillCount())
    shared = sample(counts[0])
    first = [ep.token_ids[:ep.prompt_len] for ep in shared[::3]]
    L, D = common_prefix(first), max(map(len, first))
    assert L > 2 * TINY_SLIDING_WINDOW and seen[:2] == [(1, L), (3, D - L)]
    assert counts[0].tokens == L + 3 * (D - L)  # the prefix once, the 3 distinct remainders' chunk
    monkeypatch.setattr(KVRows, "_start", plain_start)
    plain = sample(counts[1])
    assert counts[1].tokens == 3 * sum(map(len, first))
    assert sum(len(ep.turns) for ep in plain) > len(plain)  # episodes went on after their first turn
    for a, b in zip(shared, plain):
        assert a.token_ids == b.token_ids and a.action_mask == b.action_mask
        torch.testing.assert_close(torch.tensor(a.sample_logprobs), torch.tensor(b.sample_logprobs), atol=1e-5,
                                   rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("fast_decode", [True, False])
def test_completions_sampled_with_a_shared_system_prompt_equal_those_without(tiny_tokenizer, arch, fast_decode,
                                                                             monkeypatch):
    """Single-turn prompts of different lengths after one system message: the prompts' common prefix is
    prefilled once, and the samples (tokens, log-probs, fixed generator) are those of the plain prefill."""
    model = tiny(tiny_tokenizer, arch)

    def sample():
        return generate(model, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=12, system_prompt=SYSTEM,
                        generator=torch.Generator().manual_seed(1), fast_decode=fast_decode)

    seen = trunk_calls(model)
    shared = sample()
    P = shared.prompt_ids_BP.shape[1]
    L = common_prefix([ids[mask].tolist() for ids, mask in zip(shared.prompt_ids_BP, shared.prompt_mask_BP)])
    assert L > 2 * TINY_SLIDING_WINDOW and seen[:2] == [(1, L), (3, P - 1 - L)]
    monkeypatch.setattr(sampling, "shared_prefill", lambda *args: 0)
    plain = sample()
    lengths_G = shared.prompt_mask_BP[::2].sum(1)
    # each prompt once but its last column in both its rows; shared: the prefix once, the shift s_g = P - n_g of
    # each row's first L columns padding, the rest of them taken from the prefix
    assert plain.prefill_tokens == int(lengths_G.sum()) - 3 + 6
    assert shared.prefill_tokens == plain.prefill_tokens - 2 * L + int((P - lengths_G).sum())
    assert torch.equal(shared.completion_ids_BC, plain.completion_ids_BC)
    assert torch.equal(shared.completion_mask_BC, plain.completion_mask_BC)
    torch.testing.assert_close(shared.sample_logprobs_BC, plain.sample_logprobs_BC, atol=1e-5, rtol=0)


def test_identical_prompts_leave_nothing_after_the_prefix(tiny_tokenizer):
    """Two identical prompts: the shared prefix is all the prefill (no second trunk call); the rows sample
    as one prompt alone does."""
    model = tiny(tiny_tokenizer, "llama")
    seen = trunk_calls(model)
    both = generate(model, tiny_tokenizer, [PROMPTS[1], PROMPTS[1]], greedy=True, max_new_tokens=6)
    P = both.prompt_ids_BP.shape[1]
    assert seen[0] == (1, P - 1) and seen[1] == (2, 1)
    alone = generate(model, tiny_tokenizer, [PROMPTS[1]], greedy=True, max_new_tokens=6)
    assert torch.equal(both.completion_ids_BC[1], alone.completion_ids_BC[0])
    torch.testing.assert_close(both.sample_logprobs_BC[1], alone.sample_logprobs_BC[0], atol=1e-5, rtol=0)



def test_the_step_logs_the_prefill_tokens(tiny_tokenizer):
    """``sampling/prefill_tokens``: what the sampler counted; ``sampling/prefill_shared_tokens``: the rows'
    prompt tokens beyond it.  A batch that was not counted logs neither."""
    from seqpg.batch import concat_rollouts
    from seqpg.rollout.interface import Completions
    from seqpg.rollout.sampling import SampleSettings

    model = tiny(tiny_tokenizer, "llama")
    batch = generate(model, tiny_tokenizer, PROMPTS, n=2, max_new_tokens=4, system_prompt=SYSTEM)
    rollouts = Completions(sampling=SampleSettings(max_new_tokens=4))
    m = rollouts.metrics(batch, lambda t: t, lambda t: t)
    held = int(batch.prompt_mask_BP.sum())
    assert m == {"sampling/prefill_tokens": batch.prefill_tokens,
                 "sampling/prefill_shared_tokens": held - batch.prefill_tokens}
    assert 0 < batch.prefill_tokens < held / 2
    both = concat_rollouts([batch, batch], tiny_tokenizer.pad_token_id)
    assert rollouts.metrics(both, lambda t: t, lambda t: t)["sampling/prefill_tokens"] == 2 * batch.prefill_tokens
    assert rollouts.metrics(batch.select([0, 1]), lambda t: t, lambda t: t) == {}
