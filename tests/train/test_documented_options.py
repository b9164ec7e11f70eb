"""Documented options that had no effect somewhere now have one."""

from __future__ import annotations

import torch

from seqpg.build import build_policy
from seqpg.config import ModelConfig


def test_gradient_checkpointing_recomputes_the_tiny_models_activations_too():
    for on in (False, True):
        model, _ = build_policy(ModelConfig(name="tiny", tiny_layers=1, gradient_checkpointing=on), 0,
                                torch.device("cpu"))
        calls = []
        # a pre-hook at the start of the checkpointed layer (recomputation stops early, before its end)
        model.model.layers[0].input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
        model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
        assert len(calls) == (2 if on else 1)  # with checkpointing the backward pass runs the layer again
