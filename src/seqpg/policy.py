"""Training-time log-probabilities of sampled completions under the current policy.

For a rollout laid out as ``[prompt (left-padded to P) | completion (right-padded to C)]``,
the log-probability of completion token ``t`` is read from the logits at column ``P + t - 1``:

    log pi(y_t | x, y_<t) = log softmax(z_{P+t-1} / T)[y_t]

Only the ``C + 1`` last columns of logits are materialised (``logits_to_keep=C+1``; the last
column predicts a token past the completion and is dropped), so the (B, P, V) prompt logits are
never built; the (B, C, V) slice goes to the core's chunked ``token_logprobs`` and
``entropy_from_logits``, which never copy it whole.  Position ids are counted over real tokens
only, so a left-padded row sees the same positions as it would unpadded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from seqpg.batch import RolloutBatch
from seqpg.core import entropy_from_logits, token_logprobs


@dataclass
class CompletionLogprobs:
    """What one forward pass of the policy over a rollout gives."""

    logprobs_BC: torch.Tensor  # (B, C) float32, log pi(y_t | ...) at the temperature, 0 on padding
    entropy_BC: torch.Tensor | None = None  # (B, C) float32, entropy of the tempered distribution, 0 on padding
    hidden_BCH: torch.Tensor | None = None  # (B, C, H) last hidden state at column P+t-1 (the state before y_t)


def position_ids_from_mask(mask_BL: torch.Tensor) -> torch.Tensor:
    """(B, L) long: for each real token, the number of real tokens before it; 0 on padding."""
    if mask_BL.dim() != 2:
        raise ValueError(f"position_ids_from_mask: mask must be (B, L), got {tuple(mask_BL.shape)}")
    mask_BL = mask_BL.long()
    return (mask_BL.cumsum(dim=1) - 1).clamp(min=0) * mask_BL  # (B, L)


def completion_logprobs(
    model: nn.Module,
    batch: RolloutBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> CompletionLogprobs:
    """Log-probabilities (B, C) of ``batch``'s completion tokens under ``model`` at ``temperature``.

    Gradients flow when called outside ``torch.no_grad``.  ``hidden_BCH`` (for a value head on
    the policy's own trunk) comes from the same forward pass, asked for with ``with_hidden``.
    """
    if temperature <= 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature}")
    C = batch.completion_ids_BC.shape[1]
    mask_BL = batch.attention_mask_BL
    out = model(
        input_ids=batch.input_ids_BL,  # (B, P+C)
        attention_mask=mask_BL.long(),
        position_ids=position_ids_from_mask(mask_BL),
        logits_to_keep=C + 1,
        output_hidden_states=with_hidden,
        use_cache=False,
    )
    logits_BCV = out.logits[:, :-1]  # (B, C, V) column P+t-1 predicts completion token t
    pad_BC = ~batch.completion_mask_BC
    logprobs_BC = token_logprobs(logits_BCV, batch.completion_ids_BC, temperature).masked_fill(pad_BC, 0.0)
    entropy_BC = None
    if with_entropy:
        entropy_BC = entropy_from_logits(logits_BCV, temperature).masked_fill(pad_BC, 0.0)
    hidden_BCH = out.hidden_states[-1][:, -(C + 1):-1] if with_hidden else None  # (B, C, H)
    return CompletionLogprobs(logprobs_BC=logprobs_BC, entropy_BC=entropy_BC, hidden_BCH=hidden_BCH)

