"""One function turns a per-token loss (B, T) into the scalar that is differentiated.

With per-token losses l_{i,t}, mask m_{i,t}, |o_i| = sum_t m_{i,t} real tokens in row i:

    token-mean               L = sum_{i,t} m l / N_tok                    DAPO (Yu et al. 2025)
    seq-mean-token-mean      L = sum_i (sum_t m l / |o_i|) / N_seq        GRPO (Shao et al. 2024)
    seq-mean-token-sum       L = sum_i sum_t m l / N_seq                  REINFORCE estimate
    seq-mean-token-sum-norm  L = sum_{i,t} m l / (N_seq * L_max)          Dr. GRPO (Liu et al. 2025)

The mode names are verl's (``agg_loss``). N_tok, N_seq and L_max default to this batch's counts
(real tokens, rows, T). A trainer that splits a batch into micro-batches or across processes
passes the GLOBAL counts (``num_tokens``, ``num_seqs``, ``max_len``) to every share; every mode
is then a plain sum over rows, so the shares' losses and gradients SUM exactly to the full
batch's: the result does not depend on how the batch is split.

Empty rows (no real token): contribute 0 and still count in N_seq (N_seq defaults to B, all
rows), in every seq-mean mode. An empty batch gives a loss of 0 in token-mean.

Departures from verl: verl divides ``seq-mean-token-sum-norm`` by T only (its sum over rows is
not averaged), i.e. verl's value is N_seq times ours; ours is Dr. GRPO's released objective
1/G sum_i sum_t l / L_max. verl's ``seq-mean-token-mean`` gives NaN on an empty row; ours 0.
"""

from __future__ import annotations

import torch

from ._checks import check_mask, check_positive, check_rank, check_same_shape

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def check_agg_mode(mode: str) -> None:
    """Raise a ValueError listing the valid modes if ``mode`` is not one."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")


Count = int | float | torch.Tensor


def aggregate_loss(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, *, num_tokens: Count | None = None,
                   num_seqs: Count | None = None, max_len: Count | None = None) -> torch.Tensor:
    """The scalar loss of ``loss_BT`` under aggregation ``mode`` (module table). (B, T), (B, T) -> ().

    ``num_tokens`` / ``num_seqs`` / ``max_len``: global counts replacing this batch's real-token
    count, row count B, and T, so that micro-batches and processes sum to the full-batch loss.
    """
    check_agg_mode(mode)
    check_rank("loss_BT", loss_BT, 2, "(B, T)")
    mask = check_mask("mask_BT", mask_BT)
    check_same_shape("mask_BT", mask, "loss_BT", loss_BT)
    for name, v in (("num_tokens", num_tokens), ("num_seqs", num_seqs), ("max_len", max_len)):
        if v is not None:
            check_positive(name, v)
    B, T = loss_BT.shape
    masked_BT = torch.where(mask, loss_BT, 0)
    if mode == "token-mean":
        n_tok = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
        return masked_BT.sum() / n_tok
    n_seq = num_seqs if num_seqs is not None else max(B, 1)
    if mode == "seq-mean-token-mean":
        per_row_B = masked_BT.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,) 0 for an empty row
        return per_row_B.sum() / n_seq
    if mode == "seq-mean-token-sum":
        return masked_BT.sum() / n_seq
    return masked_BT.sum() / (n_seq * (max_len if max_len is not None else max(T, 1)))
