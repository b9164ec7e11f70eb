"""The one place that decides the precision of a forward pass.

A run's ``bf16`` setting is resolved once (``StepSettings.bf16``); every forward pass of the step
(sampling, scoring's greedy baseline, the reference and critic passes, the update's micro-batches)
and the benchmark's seqpg side enter :func:`autocast` with it, so no stage decides on its own.
Weights stay float32 (master weights); autocast runs the matrix products in bfloat16.
"""

from __future__ import annotations

from typing import ContextManager

import torch


def autocast(device_type: str, bf16: bool) -> ContextManager:
    """bfloat16 autocast on ``device_type`` when ``bf16``, else a context that changes nothing."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)
