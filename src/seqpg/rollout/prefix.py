"""The prompt tokens that a step's rows share, prefilled once.

A step's rows often begin alike: the same system message and tool schema, then each prompt's
question.  Left-padded to T columns, row b holds its n_b real tokens in columns s_b = T - n_b ..
T - 1, at positions 0 .. n_b - 1.  When every row begins with the same L tokens (the longest
common prefix, L <= T), row b's first L columns hold s_b padding columns, then the prefix's first
L - s_b tokens at positions 0 .. L - s_b - 1.  A key or value there depends only on the tokens up
to it and its position, so it is the same in every row, and it is computed once::

    K_1L, V_1L = trunk(prefix)                         # one row, no padding: positions 0 .. L - 1
    K_bc = K_1(c - s_b)  for s_b <= c < L              # row b's first L columns: the row shifted right
    K_bc = 0             for c < s_b                   # its padding (masked)

and the caller's forward then runs columns L .. T - 1 with the attention mask and positions of the
whole left-padded block, as it would have.  The layout, masks and positions are those of the plain
prefill (left padding only, no gap inside a row), so a sliding window (Gemma 3's) sees the same
columns; only the arithmetic of the first L columns is done once instead of once per row.

The longer rows' remainders start at column L; a row shorter than the longest recomputes in
columns L .. T - 1 the part of the prefix its shift pushed there (s_b tokens at most), as the
plain prefill computed its padding there.  Rows that are identical throughout are the caller's
to compute once (a single-turn group's prompt; the multi-turn sampler's identical first inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PrefillCount:
    """The prompt tokens a sampling call ran through the model, counted by the sampler into an object the
    caller passes in (``sample_episodes(prefill=...)``)."""

    tokens: int = 0


def common_prefix(rows: list[list[int]]) -> int:
    """The length of the longest prefix that every row begins with (0 for no rows)."""
    if not rows:
        return 0
    first, L = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        k = 0
        while k < L and r[k] == first[k]:
            k += 1
        L = k
    return L


def shared_prefill(trunk: nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor, cache, cache_kwarg: str) -> int:
    """Prefill columns 0 .. L - 1 of the left-padded rows ``ids_BT`` (B, T) into the empty ``cache``, their
    common prefix computed once (module docstring); -> L, the columns done (0: nothing shared, nothing done).

    ``mask_BT`` (B, T) bool: True on real tokens, all of them after a row's padding.  ``trunk``: the model's
    decoder (no logits are needed here); ``cache``: a :func:`seqpg.rollout.sampling.preallocated_cache` of
    B rows to be (its layers' ``spread_rows``), passed as ``cache_kwarg``.  The caller then runs columns
    L .. T - 1 with the block's whole mask and positions.  Fewer than two rows share nothing."""
    if ids_BT.dim() != 2 or mask_BT.shape != ids_BT.shape:
        raise ValueError(f"shared_prefill: ids and mask must be one (B, T) shape, got {tuple(ids_BT.shape)}, "
                         f"{tuple(mask_BT.shape)}")
    B, T = ids_BT.shape
    if B < 2 or T == 0:
        return 0
    n_B = mask_BT.sum(dim=1)
    rows = [ids[T - n:].tolist() for ids, n in zip(ids_BT.cpu(), n_B.tolist())]
    L = common_prefix(rows)
    if L == 0:
        return 0
    prefix_1L = ids_BT[:1, T - int(n_B[0]):T - int(n_B[0]) + L]
    positions_1L = torch.arange(L, device=ids_BT.device)[None]
    trunk(input_ids=prefix_1L, attention_mask=torch.ones_like(prefix_1L), position_ids=positions_1L, use_cache=True,
          **{cache_kwarg: cache})
    shift_B = (T - n_B).clamp(max=L)  # row b's left padding within the first L columns
    for layer in cache.layers:
        layer.spread_rows(shift_B)
    return L
