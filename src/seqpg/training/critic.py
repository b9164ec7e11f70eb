"""The critic of actor-critic families (a2c, ppo): V(s_t) for the state before completion token t.

Two layouts:
  * ``separate`` — its own transformer trunk (a copy of the policy's initial trunk) and a
    value head; the policy and critic share nothing.
  * ``shared``   — a value head on the policy's trunk: one forward pass gives logits and values,
    and the value loss also shapes the policy's trunk (cheaper, couples the two losses).
"""

from __future__ import annotations

import copy
import os

import torch
import transformers
from torch import nn

from ..batch import RolloutBatch
from ..model.loading import is_lora_model, resolve_model
from ..model.policy import CompletionLogprobs, completion_logprobs, position_ids_from_mask


class ValueHead(nn.Module):
    """V = w . h + b, with w = 0 and b = 0 at initialisation (the critic starts at V = 0)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_BCH: torch.Tensor) -> torch.Tensor:
        """(B, C, H) hidden states -> (B, C) float32 values."""
        if hidden_BCH.dim() != 3:
            raise ValueError(f"ValueHead: hidden must be (B, C, H), got {tuple(hidden_BCH.shape)}")
        return self.linear(hidden_BCH.to(self.linear.weight.dtype)).squeeze(-1).float()  # (B, C)


class ValueCritic(nn.Module):
    """A separate critic: a transformer trunk (``AutoModel``, no LM head) and a ``ValueHead``."""

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = ValueHead(hidden_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> "ValueCritic":
        trunk = transformers.AutoModel.from_pretrained(resolve_model(path), dtype=dtype, local_files_only=True)
        return cls(trunk, trunk.config.hidden_size)

    def forward(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, C) values V(s_t), from the trunk's last hidden state at column P+t-1."""
        C = batch.completion_ids_BC.shape[1]
        mask_BL = batch.attention_mask_BL
        hidden_BLH = self.trunk(input_ids=batch.input_ids_BL, attention_mask=mask_BL.long(),
                                position_ids=position_ids_from_mask(mask_BL), use_cache=False).last_hidden_state
        return self.head(hidden_BLH[:, -(C + 1):-1])  # (B, C)


def critic_values(critic: ValueCritic | ValueHead, batch: RolloutBatch, *,
                  policy_out: CompletionLogprobs | None = None) -> torch.Tensor:
    """(B, C) V(s_t) for the state before completion token t, 0 on completion padding.

    ``critic`` is a ``ValueCritic`` (own trunk, runs on ``batch``) or a ``ValueHead`` shared with
    the policy's trunk, which reads ``policy_out.hidden_BCH`` from ``completion_logprobs(...,
    with_hidden=True)``, so the trunk runs once for both logits and values.  The values are on
    the critic's device (``batch`` is moved there).
    """
    batch = batch.to(next(critic.parameters()).device)
    if isinstance(critic, ValueHead):
        if policy_out is None or policy_out.hidden_BCH is None:
            raise ValueError("critic_values: a shared ValueHead needs policy_out from "
                             "completion_logprobs(..., with_hidden=True)")
        values_BC = critic(policy_out.hidden_BCH)
    elif isinstance(critic, ValueCritic):
        values_BC = critic(batch)
    else:
        raise TypeError(f"critic_values: expected ValueCritic or ValueHead, got {type(critic).__name__}")
    return values_BC.masked_fill(~batch.completion_mask_BC, 0.0)


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
