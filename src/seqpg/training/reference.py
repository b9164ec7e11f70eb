"""The reference policy pi_ref of a KL penalty: the frozen starting policy.

LoRA runs need no copy: the policy itself with its adapters disabled is exactly the initial
policy (PEFT freezes the base weights).  Full fine-tuning keeps a frozen deep copy made before
the first update.  ``seqpg explain`` builds it the same way, from the run's initial model.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from ..batch import RolloutBatch
from ..model.loading import is_lora_model
from ..model.policy import completion_logprobs


@contextlib.contextmanager
def reference_logprobs_context(model: nn.Module) -> Iterator[nn.Module]:
    """Yields the reference policy pi_ref for a LoRA ``model``: the same module, adapters off.

    For a model without adapters use ``ReferencePolicy`` (it keeps a frozen copy).
    """
    if not is_lora_model(model):
        raise TypeError("reference_logprobs_context needs a peft.PeftModel; "
                        "for full fine-tuning use ReferencePolicy(model), which keeps a frozen copy")
    with model.disable_adapter():
        yield model


class ReferencePolicy:
    """The frozen starting policy pi_ref, for KL(pi || pi_ref).

    LoRA: no copy; the policy itself is run with its adapters disabled (the base weights are
    frozen by PEFT, so this is exactly the initial policy).  Full fine-tuning: a deep copy made at
    construction, in eval mode with ``requires_grad=False``.
    """

    def __init__(self, model: nn.Module) -> None:
        self._lora_model = model if is_lora_model(model) else None
        self._frozen = None
        if self._lora_model is None:
            self._frozen = copy.deepcopy(model).eval()
            self._frozen.requires_grad_(False)

    def logprobs(self, batch: RolloutBatch, *, temperature: float = 1.0) -> torch.Tensor:
        """(B, C) log pi_ref of the batch's completion tokens, without gradients, 0 on padding; on the
        batch's device."""
        device = batch.completion_mask_BC.device
        with torch.no_grad():
            if self._frozen is not None:
                return completion_logprobs(self._frozen, batch, temperature=temperature).logprobs_BC.to(device)
            was_training = self._lora_model.training
            self._lora_model.eval()
            try:
                with reference_logprobs_context(self._lora_model) as ref:
                    return completion_logprobs(ref, batch, temperature=temperature).logprobs_BC.to(device)
            finally:
                self._lora_model.train(was_training)
