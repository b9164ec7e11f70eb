"""The critic of actor-critic families (a2c, ppo): V(s_t) for the state before completion token t.

Two layouts:
  * ``separate`` — its own transformer trunk (a copy of the policy's initial trunk) and a
    value head; the policy and critic share nothing.
  * ``shared``   — a value head on the policy's trunk: one forward pass gives logits and values,
    and the value loss also shapes the policy's trunk (cheaper, couples the two losses).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .batch import RolloutBatch
from .models import ValueCritic, ValueHead, critic_values, is_lora_model
from .policy import CompletionLogprobs, completion_logprobs


class Critic:
    """A value function the update can train; ``module`` holds its own parameters."""

    def __init__(self, module: ValueCritic | ValueHead, policy: nn.Module, shared: bool) -> None:
        self.module, self.policy, self.shared = module, policy, shared

    def own_parameters(self):
        return self.module.parameters()

    def values(self, policy_out: CompletionLogprobs, rollout: RolloutBatch) -> torch.Tensor:
        """(B, C) values with gradients (for the value loss)."""
        return critic_values(self.module, rollout, policy_out=policy_out if self.shared else None)

    @torch.no_grad()
    def values_of(self, rollout: RolloutBatch) -> torch.Tensor:
        """(B, C) values at sampling time, without gradients (for GAE and value clipping); on the
        rollout's device."""
        out = completion_logprobs(self.policy, rollout, with_hidden=True) if self.shared else None
        return critic_values(self.module, rollout, policy_out=out).to(rollout.completion_mask_BC.device)


def _trunk(policy: nn.Module) -> nn.Module:
    model = policy.get_base_model() if is_lora_model(policy) else policy
    return model.base_model


def build_critic(policy: nn.Module, *, shared: bool, seed: int = 0) -> Critic:
    """A critic for ``policy``: a head on its trunk (shared) or a copy of its trunk with a head."""
    hidden = policy.config.hidden_size
    device = next(policy.parameters()).device
    if shared:
        return Critic(ValueHead(hidden).to(device), policy, shared=True)
    trunk = copy.deepcopy(_trunk(policy))
    trunk.requires_grad_(True)
    return Critic(ValueCritic(trunk, hidden).to(device), policy, shared=False)
