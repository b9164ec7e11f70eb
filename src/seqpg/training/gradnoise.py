"""The gradient noise scale of each update, measured on the gradients the update accumulates anyway.

The update sums the gradients of a mini-batch's micro-batches in ``p.grad``. After micro-batch i's
backward (all but the last), ``p.grad`` holds acc_i, the sum of the first i micro-batches' shares of
the mini-batch gradient: over r_i of the mini-batch's R rows, so acc_i * R / r_i is a mean gradient of
r_i samples, and its squared norm one observation of E |G_r|^2 = |G|^2 + tr(Sigma) / r. The last
observation is the whole mini-batch's gradient, whose norm the update computes for clipping anyway.
So the cost is one squared norm of the gradients per micro-batch but the last (a read of the gradient
buffers; no copy, no extra memory), and the nested observations go to the core's least-squares fit
(:func:`seqpg.core.gradient_noise_scale`; with two micro-batches, McCandlish et al.'s A.2 / A.3 with the
first micro-batch as the small batch).

Samples are rows (completions) and the scale assumes the rows of a micro-batch are exchangeable
with the rest: true when ``optim.micro_batch_size`` is a multiple of ``samples_per_prompt`` with one
mini-batch (whole groups per micro-batch, prompts iid); rows of one group are correlated, so
tr(Sigma) is then per-row noise of groups counted in rows. The gradient is every trained parameter's
(the critic's too, when there is one). With several processes (DDP) the partial observations are each
process's own (gradients reduce in the last backward only), averaged over processes; the last is global.
Not measured: with one micro-batch per mini-batch (nothing to compare; no metric rather than a wrong
one), and under FSDP2 (a partial gradient is not in ``p.grad`` there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import core

METRICS = ("gns/b_simple", "gns/grad_sq", "gns/trace_cov")


class GradientNoiseProbe:
    """Observations of one update's mini-batches; :meth:`metrics` fits them (``METRICS``), or ``{}``."""

    def __init__(self, sharded: bool = False) -> None:
        self._partial: list[tuple[torch.Tensor, float, float]] = []  # (|acc_i|^2, r_i, local rows) kept
        self._whole: list[tuple[float, float]] = []  # (|G_big|^2, local rows) kept
        self._pending: list[tuple[torch.Tensor, float]] = []  # this mini-batch's partial observations
        self._off = sharded  # FSDP2: a partial gradient is not in p.grad (the module docstring)

    def after_partial_backward(self, params: list[torch.Tensor], rows_done: int) -> None:
        """Record |p.grad|^2 after a micro-batch's backward that is not its mini-batch's last;
        ``rows_done``: this process's rows of the mini-batch whose gradients ``p.grad`` now holds."""
        grads = [p.grad for p in params if p.grad is not None]
        if self._off or not grads:
            return
        self._pending.append((torch.nn.utils.get_total_norm(grads).square(), float(rows_done)))

    def end_minibatch(self, grad_norm: float, local_rows: int, *, keep: bool) -> None:
        """The mini-batch's global gradient norm (before clipping); ``keep`` False drops it (non-finite)."""
        pending, self._pending = self._pending, []
        if not keep or not pending or self._off:
            return
        self._partial += [(sq, r, float(local_rows)) for sq, r in pending]
        self._whole.append((grad_norm ** 2, float(local_rows)))

    def metrics(self, all_reduce: Callable | None) -> dict[str, float]:
        """``gns/*`` from every kept mini-batch (the same on every process), or ``{}`` without observations."""
        if self._off or not self._partial:
            return {}
        local = torch.stack([sq.detach().to("cpu", torch.float64) for sq, _, _ in self._partial])
        summed = torch.cat([local, torch.ones(1, dtype=torch.float64)])
        if all_reduce is not None:
            summed = all_reduce(summed)
        world = float(summed[-1])  # processes
        scale = torch.tensor([(n * world / r) ** 2 for _, r, n in self._partial], dtype=torch.float64)
        sq_K = torch.cat([summed[:-1] / world * scale, torch.tensor([sq for sq, _ in self._whole],
                                                                    dtype=torch.float64)])
        sizes_K = torch.tensor([r for _, r, _ in self._partial] + [n * world for _, n in self._whole],
                               dtype=torch.float64)
        if not bool(torch.isfinite(sq_K).all()) or len(set(sizes_K.tolist())) < 2:
            return {}
        est = core.gradient_noise_scale(sq_K, sizes_K)
        return {"gns/b_simple": float(est.b_simple), "gns/grad_sq": float(est.grad_sq),
                "gns/trace_cov": float(est.trace_cov)}
