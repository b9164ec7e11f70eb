"""Door checks shared by the maths core: types, ranks, shapes, masks, finiteness.

Every public function of :mod:`seqpg.core` checks its arguments here on entry, so that a
mistake is reported where it is made: a ``ValueError`` (``TypeError`` for a non-tensor) that
names the argument, the shape it should have, and the shape it has.
"""

from __future__ import annotations

import torch

Number = int | float


def check_tensor(name: str, x: object) -> torch.Tensor:
    """``x`` itself, after checking that it is a tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_rank(name: str, x: object, rank: int, dims: str) -> torch.Tensor:
    """``x`` itself, after checking it has ``rank`` dimensions (``dims`` spells them, e.g. ``"(B, T)"``)."""
    x = check_tensor(name, x)
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {dims} (rank {rank}), got shape {tuple(x.shape)}")
    return x


def check_same_shape(name: str, x: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``x`` itself, after checking it has the shape of ``ref``."""
    x = check_tensor(name, x)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    return x


def check_mask(name: str, mask: object, rank: int = 2, dims: str = "(B, T)") -> torch.Tensor:
    """The mask as a bool tensor. Accepts bool, or 0/1 numbers (any other value is an error)."""
    mask = check_rank(name, mask, rank, dims)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got dtype {mask.dtype} with other values")
    return mask != 0


def check_finite(name: str, x: torch.Tensor, where_BT: torch.Tensor | None = None) -> None:
    """Raise if ``x`` holds NaN or +-inf (only where ``where_BT`` is True, if given), naming the row."""
    bad = ~torch.isfinite(x)
    if where_BT is not None:
        bad = bad & where_BT
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds a non-finite value ({float(x[idx])}) at row {idx[0]} "
                         f"(index {idx}, shape {tuple(x.shape)})")


def check_positive(name: str, value: object) -> None:
    """Raise unless ``value`` is a tensor (not checked: no device sync) or a number > 0."""
    if isinstance(value, torch.Tensor):
        return
    if not isinstance(value, Number) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def check_unit(name: str, value: object) -> None:
    """Raise unless ``value`` is a number in [0, 1] (a discount or a GAE lambda)."""
    if not isinstance(value, Number) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def float_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the dtype the core computes in."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def empty_rows(mask_BT: torch.Tensor) -> list[int]:
    """Indices of rows with no real token."""
    return [int(i) for i in (~mask_BT.any(dim=1)).nonzero().flatten()]


def check_no_empty_rows(name: str, mask_BT: torch.Tensor, why: str) -> None:
    """Raise if any row of ``mask_BT`` has no real token (``why`` says what needed one)."""
    rows = empty_rows(mask_BT)
    if rows:
        shown = rows[:10] + (["..."] if len(rows) > 10 else [])
        raise ValueError(f"{name} (shape {tuple(mask_BT.shape)}) has rows with no real token: {shown}; {why}")


def last_token_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """(B,) long: the column of each row's last real token (callers check for empty rows first)."""
    T = mask_BT.shape[1]
    return T - 1 - mask_BT.flip(1).int().argmax(dim=1)  # (B,)


def first_token_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """(B,) long: the column of each row's first real token (callers check for empty rows first)."""
    return mask_BT.int().argmax(dim=1)  # (B,)
