"""Attention of the shared-prompt layout (``seqpg.model.policy``) computed block by block.

A packed row ``[prompt | y^1 | y^2 | ... | y^K | padding]`` lets the prompt attend causally to
itself and each completion segment attend to the prompt and causally to itself.  A dense
(L, L) mask describes that, but the attention kernel then does all L^2 (query, key) pairs:
for 2 prompts of ~75 tokens x 8 completions of 31 it is ~4x the pairs that are allowed.  This
module computes the same attention as two dense blocks with nothing wasted but padding::

    prompt:   softmax(Q_p K_p^T * s + causal) V_p                    # (G, H, P, D), P = longest prompt
    segment:  softmax(Q_b [K_p; K_b]^T * s + mask_b) [V_p; V_b]      # (B, H, S, D), S = longest segment

where row b's keys are its prompt's P columns (those past the prompt's length masked) followed
by its own S segment columns (causal).  The queries, keys and values are gathered from the
packed row, the outputs scattered back to their columns (padding columns get 0).  The blocks
run in float32 even under bf16 autocast: on CPUs torch's bf16 attention backward is slower than
the float32 one for these small blocks (the timings: docs/measurements.md).

It plugs into Hugging Face models through their attention interface: ``use(model)`` switches
the model's attention implementation to this module's function for one forward, and the
layout travels to every layer as the ``seqpg_segments`` keyword.  A call without it (any other
forward) is plain SDPA with the mask it was given.  ``applies(model)`` names the families whose
layers pass keyword arguments through to the attention function (checked by the tests).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

NAME = "seqpg_segments"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class SegmentLayout:
    """Where the blocks' queries and keys live in the packed (G, L) rows, as flat indices g * L + column."""

    L: int
    prompt_q_GP: torch.Tensor  # (G, P) long: the first P columns of each row
    prompt_allowed_G1PP: torch.Tensor  # (G, 1, P, P) bool: causal, keys inside the prompt
    prompt_real_flat: torch.Tensor  # (Np,) long: index into (G*P) of real prompt queries
    prompt_dest: torch.Tensor  # (Np,) long: their flat column g * L + j
    seg_q_BS: torch.Tensor  # (B, S) long: flat column of segment query s of row b (a valid dummy on padding)
    seg_k_BK: torch.Tensor  # (B, P + S) long: the row's prompt columns, then its segment's
    seg_allowed_B1SK: torch.Tensor  # (B, 1, S, P + S) bool
    seg_real_flat: torch.Tensor  # (Ns,) long: index into (B*S) of real segment queries
    seg_dest: torch.Tensor  # (Ns,) long: their flat column

    def on(self, device: torch.device) -> "SegmentLayout":
        """The layout with its index tensors on ``device`` (itself when they are there already)."""
        if self.prompt_q_GP.device == device:
            return self
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return SegmentLayout(**moved)

    @classmethod
    def build(cls, L: int, prompt_len_G: torch.Tensor, group_B: torch.Tensor, col_BS: torch.Tensor,
              in_seg_BS: torch.Tensor) -> "SegmentLayout":
        """From the packing: row ``group_B[b]`` holds completion b's input token t at column
        ``col_BS[b, t]`` where ``in_seg_BS[b, t]``; prompt g occupies columns ``0 .. prompt_len_G[g] - 1``."""
        G = len(prompt_len_G)
        P = int(prompt_len_G.max())
        S = max(int(in_seg_BS.sum(dim=1).max()) if in_seg_BS.numel() else 0, 1)
        col_BS, in_seg_BS = _pad_cols(col_BS, S), _pad_cols(in_seg_BS, S)
        base_G = torch.arange(G) * L
        j_P = torch.arange(P)
        prompt_q_GP = base_G[:, None] + j_P[None, :]
        in_prompt_GP = j_P[None, :] < prompt_len_G[:, None]
        causal_PP = torch.ones((P, P), dtype=torch.bool).tril()
        prompt_allowed = (causal_PP[None] & in_prompt_GP[:, None, :])[:, None]
        base_B = base_G[group_B]
        seg_q_BS = base_B[:, None] + torch.where(in_seg_BS, col_BS, 0)
        seg_k_BK = torch.cat([base_B[:, None] + j_P[None, :], seg_q_BS], dim=1)
        prompt_keys_BSP = in_prompt_GP[group_B][:, None, :].expand(-1, S, -1)
        causal_SS = torch.ones((S, S), dtype=torch.bool).tril()
        seg_keys_BSS = causal_SS[None] & in_seg_BS[:, None, :]
        seg_allowed = torch.cat([prompt_keys_BSP, seg_keys_BSS], dim=2)[:, None]
        return cls(L=L, prompt_q_GP=prompt_q_GP, prompt_allowed_G1PP=prompt_allowed,
                   prompt_real_flat=in_prompt_GP.reshape(-1).nonzero().squeeze(1),
                   prompt_dest=prompt_q_GP[in_prompt_GP], seg_q_BS=seg_q_BS, seg_k_BK=seg_k_BK,
                   seg_allowed_B1SK=seg_allowed, seg_real_flat=in_seg_BS.reshape(-1).nonzero().squeeze(1),
                   seg_dest=seg_q_BS[in_seg_BS])


def _pad_cols(x_BT: torch.Tensor, S: int) -> torch.Tensor:
    """The first S columns of x, zero/False-padded when x has fewer."""
    if x_BT.shape[1] >= S:
        return x_BT[:, :S]
    return torch.cat([x_BT, x_BT.new_zeros((x_BT.shape[0], S - x_BT.shape[1]))], dim=1)


def applies(model: nn.Module) -> bool:
    """True when the model is a family whose layers hand keywords to the attention function, on SDPA,
    without gradient checkpointing (its recomputation runs after ``use`` has switched back), on the CPU.

    On a GPU the shared-prompt layout keeps its dense mask: SDPA with it is one kernel per layer,
    where the blocks take a dozen small gathers and products whose launches cost more than the
    FLOPs they save at these sizes (the CPU, by contrast, is bound by the FLOPs)."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    param = next(inner.parameters(), None)
    return (getattr(config, "model_type", None) in FAMILIES and getattr(config, "_attn_implementation", None) == "sdpa"
            and not _checkpointing(inner) and (param is None or param.device.type == "cpu"))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wrapper holds (its config and attention), else the model."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, by transformers 5's name or the older one."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False


@contextmanager
def use(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through :func:`attention` for the forwards inside the block."""
    import transformers

    transformers.AttentionInterface.register(NAME, attention)
    config = _unwrap(model).config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def attention(module: nn.Module, query_GHLD: torch.Tensor, key_GKLD: torch.Tensor, value_GKLD: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              seqpg_segments: SegmentLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Hugging Face attention-interface function: output (G, L, H, D) and no weights."""
    if seqpg_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query_GHLD, key_GKLD, value_GKLD, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    lay = seqpg_segments.on(query_GHLD.device)
    if query_GHLD.dim() != 4 or query_GHLD.shape[2] != lay.L:
        raise ValueError(f"segment attention: queries must be (G, H, {lay.L}, D), got {tuple(query_GHLD.shape)}")
    G, H, L, D = query_GHLD.shape
    Hkv = key_GKLD.shape[1]
    dtype = query_GHLD.dtype
    q_NHD = query_GHLD.transpose(1, 2).reshape(G * L, H, D).float()  # flat columns
    k_NKD = key_GKLD.transpose(1, 2).reshape(G * L, Hkv, D).float()
    v_NKD = value_GKLD.transpose(1, 2).reshape(G * L, Hkv, D).float()
    p = dropout if module.training else 0.0

    def block(q_idx: torch.Tensor, k_idx: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attention of the gathered queries (R, Q) over the gathered keys (R, K): (R*Q, H, D)."""
        R, Q = q_idx.shape
        q = q_NHD.index_select(0, q_idx.reshape(-1)).view(R, Q, H, D).transpose(1, 2)
        k = k_NKD.index_select(0, k_idx.reshape(-1)).view(R, -1, Hkv, D).transpose(1, 2)
        v = v_NKD.index_select(0, k_idx.reshape(-1)).view(R, -1, Hkv, D).transpose(1, 2)
        with torch.autocast(query_GHLD.device.type, enabled=False):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=scaling,
                                               enable_gqa=H != Hkv)
        return o.transpose(1, 2).reshape(R * Q, H, D)

    prompt_o = block(lay.prompt_q_GP, lay.prompt_q_GP, lay.prompt_allowed_G1PP)
    seg_o = block(lay.seg_q_BS, lay.seg_k_BK, lay.seg_allowed_B1SK)
    out_NHD = q_NHD.new_zeros((G * L, H, D))
    out_NHD = out_NHD.index_copy(0, lay.prompt_dest, prompt_o.index_select(0, lay.prompt_real_flat))
    out_NHD = out_NHD.index_copy(0, lay.seg_dest, seg_o.index_select(0, lay.seg_real_flat))
    return out_NHD.view(G, L, H, D).to(dtype), None
