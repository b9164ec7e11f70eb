"""4-D attention masks as a Hugging Face model takes them, with a sliding window counted in positions.

The caller says which keys each query may see, ``allowed_BQK`` (B, Q, K) bool, for a layout the
model's own masks cannot describe (packed segments, a cache with masked columns inside a row).  A
model whose layers all attend in full gets that one mask.  A model with sliding-window layers
(Gemma 3's ``layer_types``) gets a dict with one mask per layer type, as its forward takes them::

    full_attention:    allowed[b, q, k]
    sliding_attention: allowed[b, q, k]  and  pos_q[b, q] - pos_k[b, k] < window

The window is counted in positions (real tokens), as the model counts it on one unpadded row.  The
model's own masks count it in columns, which is the same only where a row has no masked column
inside it.  The mask's form is the attention implementation's: bool for ``sdpa`` (True: attend),
additive float for ``eager`` (0 or the dtype's lowest value); other implementations do not take a
4-D mask as given (:data:`MASKABLE_ATTENTION`).
"""

from __future__ import annotations

import torch
from torch import nn

MASKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a 4-D mask as it is."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def attention_implementation(model: nn.Module) -> str | None:
    """The model config's ``_attn_implementation`` (None without one)."""
    return getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)


def sliding_window(model: nn.Module) -> int | None:
    """The window of the model's sliding-window layers (Gemma 3's ``layer_types``), None without any."""
    config = getattr(_unwrap(model), "config", None)
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return None
    return getattr(config, "sliding_window", None)


def layer_masks(model: nn.Module, allowed_BQK: torch.Tensor, pos_q_BQ: torch.Tensor, pos_k_BK: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor | dict[str, torch.Tensor]:
    """The (B, 1, Q, K) mask ``allowed_BQK`` in the form ``model``'s attention takes it, or, where some of its
    layers slide a window, ``{"full_attention": ..., "sliding_attention": ...}`` (module docstring).

    ``pos_q_BQ`` (B, Q), ``pos_k_BK`` (B, K): the queries' and keys' position ids (used for the window only).
    A query that sees nothing would give NaN; the caller lets every query see at least itself."""
    if allowed_BQK.dim() != 3 or pos_q_BQ.shape != allowed_BQK.shape[:2] or pos_k_BK.shape != (
            allowed_BQK.shape[0], allowed_BQK.shape[2]):
        raise ValueError(f"layer_masks: need allowed (B, Q, K), positions (B, Q) and (B, K), got "
                         f"{tuple(allowed_BQK.shape)}, {tuple(pos_q_BQ.shape)}, {tuple(pos_k_BK.shape)}")
    implementation = attention_implementation(model)
    if implementation not in MASKABLE_ATTENTION:
        raise ValueError(f"layer_masks: attention {implementation!r} does not take a 4-D mask; "
                         f"load the model with one of {list(MASKABLE_ATTENTION)}")
    full = _as_mask(allowed_BQK, implementation, dtype)
    window = sliding_window(model)
    if window is None:
        return full
    in_window_BQK = (pos_q_BQ[:, :, None] - pos_k_BK[:, None, :]) < window
    return {"full_attention": full, "sliding_attention": _as_mask(allowed_BQK & in_window_BQK, implementation, dtype)}


def _as_mask(allowed_BQK: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Q, K): bool for sdpa; for eager, which adds the mask to the scores, 0 or the dtype's lowest value."""
    if implementation == "eager":
        return torch.zeros(allowed_BQK.shape, dtype=dtype, device=allowed_BQK.device).masked_fill_(
            ~allowed_BQK, torch.finfo(dtype).min)[:, None]
    return allowed_BQK[:, None]
