"""Documented options that had no effect somewhere now have one."""

from __future__ import annotations

import pytest
import torch

from seqpg.training.build import build_policy
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


@pytest.mark.parametrize("argv, unused", [(["--steps", "3"], "--steps"), (["--warmup", "1", "--dtypes", "bf16"],
                                                                            "--warmup, --dtypes"),
                                          (["--threads", "1", "2"], "--threads with several counts")])
def test_bench_learning_refuses_the_options_it_does_not_use(argv, unused):
    from seqpg.apps.cli import main

    with pytest.raises(SystemExit, match=f"seqpg bench --learning: {unused} does not apply"):
        main(["bench", "--learning", *argv])
