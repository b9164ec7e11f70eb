"""4-D masks per layer type, the sliding window counted in positions (``seqpg.model.attention_masks``)."""

from __future__ import annotations

import pytest
import torch

from seqpg.model.attention_masks import layer_masks
from seqpg.model.loading import TINY_SLIDING_WINDOW, build_tiny_model

W = TINY_SLIDING_WINDOW


def test_the_window_counts_positions_not_columns():
    """One query at position W + 1 over keys with masked columns between them: the sliding mask keeps the
    keys fewer than W positions back however many columns lie between; the full mask keeps them all."""
    model = build_tiny_model(16, arch="gemma3", num_layers=3)
    real_K = torch.tensor([True] * (W + 2) + [False] * 5 + [True])  # key positions 0 .. W+1, holes, then W+2
    pos_K = (real_K.long().cumsum(0) - 1).clamp(min=0)
    allowed_1QK = real_K[None, None]
    masks = layer_masks(model, allowed_1QK, torch.tensor([[W + 2]]), pos_K[None], torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert torch.equal(masks["full_attention"], allowed_1QK[:, None])
    assert masks["sliding_attention"][0, 0, 0].nonzero().squeeze(1).tolist() == list(range(3, W + 2)) + [W + 7]


def test_forms_by_implementation():
    llama = build_tiny_model(16)
    allowed = torch.tensor([[[True, False]]])
    pos = torch.zeros((1, 1), dtype=torch.long), torch.zeros((1, 2), dtype=torch.long)
    assert torch.equal(layer_masks(llama, allowed, *pos, torch.float32), allowed[:, None])  # one mask, no window
    llama.config._attn_implementation = "eager"
    additive = layer_masks(llama, allowed, *pos, torch.float32)
    assert additive[0, 0, 0].tolist() == [0.0, torch.finfo(torch.float32).min]
    llama.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="does not take a 4-D mask"):
        layer_masks(llama, allowed, *pos, torch.float32)
