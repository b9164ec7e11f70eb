"""Model FLOP counts by hand on layouts small enough to enumerate, and the shape read from a model."""

from __future__ import annotations

import torch

from seqpg.model.flops import ModelShape, TokenCounts, per_sample_counts, shared_prompt_counts, train_flops


def test_per_sample_counts_by_hand():
    # sample 1: prompt 2 + completion 3 -> 5 positions, 3 logits, 1+2+3+4+5 = 15 (query, key) pairs
    # sample 2: prompt 1 + completion 1 -> 2 positions, 1 logit, 1+2 = 3 pairs
    assert per_sample_counts([2, 1], [3, 1]) == TokenCounts(trunk=7, head=4, attention_pairs=18)


def test_shared_prompt_counts_by_hand():
    # one group: prompt of 3 (pairs 1+2+3 = 6, one logit: its last column)
    # completion of 3: inputs y0, y1 at positions 3, 4 -> pairs 4 + 5 = 9, logits 2
    # completion of 1: no inputs, its one token is predicted by the prompt's shared last column
    assert shared_prompt_counts([3], [[3, 1]]) == TokenCounts(trunk=5, head=3, attention_pairs=15)


def test_shared_layout_needs_fewer_flops_than_per_sample():
    shape = ModelShape(trunk_linear_params=100, d_model=4, d_attn=4, vocab=10, n_layers=2)
    per_sample = per_sample_counts([3] * 4, [5] * 4)
    shared = shared_prompt_counts([3], [[5] * 4])
    assert train_flops(shape, shared) < train_flops(shape, per_sample)


def test_train_flops_formula():
    shape = ModelShape(trunk_linear_params=100, d_model=4, d_attn=6, vocab=10, n_layers=2)
    counts = TokenCounts(trunk=7, head=3, attention_pairs=5)
    assert train_flops(shape, counts) == 3 * (2 * 100 * 7 + 2 * 4 * 10 * 3 + 4 * 6 * 2 * 5)


def test_model_shape_of_tiny_llama(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer  # hidden 32, 2 layers, 4 heads, MLP 64, vocab 101, untied head
    shape = ModelShape.of(model)
    per_layer = 4 * 32 * 32 + 3 * 32 * 64  # q, k, v, o and gate, up, down
    assert shape == ModelShape(trunk_linear_params=2 * per_layer, d_model=32, d_attn=32, vocab=101, n_layers=2)
    assert shape.trunk_linear_params == sum(p.numel() for n, p in model.named_parameters()
                                            if "proj" in n and p.dim() == 2)
    assert isinstance(model.lm_head, torch.nn.Linear)
