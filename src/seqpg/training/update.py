"""One policy (and critic) update on a scored batch: epochs x mini-batches x micro-batches.

The loss of every micro-batch is normalised by the counts of its whole mini-batch
(``num_tokens``, ``num_seqs``, ``max_len`` handed to the core), so the gradient that the
optimizer sees after accumulation is the mini-batch's gradient, whatever the micro-batch
size.  With several processes the counts are summed over all of them (``all_reduce``), each
process's loss is its share of the global mini-batch's loss, and the gradients are SUMMED
across processes (``grad_sync``; see :mod:`seqpg.training.distributed`): the optimizer step is the
same whatever the number of processes.  Every process holds the same number of rows, so all
take the same number of optimizer steps.  Reported statistics are global too: each process
weights its tokens by the global token count and the sums are reduced once at the end.
A mini-batch whose loss or global gradient norm is not finite takes no optimizer step (the weights
and the optimizer's moments stay as they were; ``on_nonfinite="skip"``): ``skipped_steps`` reports
the fraction skipped and ``nonfinite_steps`` their number.  With ``on_nonfinite="stop"`` it raises
:class:`NonFiniteError` instead, before the optimizer touches the weights.
With two or more micro-batches per mini-batch the update also reports the gradient noise scale
(``gns/b_simple``, ``gns/grad_sq``, ``gns/trace_cov``; :mod:`seqpg.training.gradnoise`) from the
accumulated gradient's norm after each micro-batch: no extra backward, no copy of the gradients.
With ``grad_noise`` set, a mini-batch that would be one micro-batch is run as two (cut at the group
boundary nearest its middle, :func:`noise_split`) so that every update reports it: the same gradient,
summed from two backward passes of half the rows each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ContextManager, Protocol

import torch

from .. import core
from ..batch import RolloutBatch
from ..model.policy import completion_logprobs, model_device
from .gradnoise import GradientNoiseProbe
from .precision import autocast


@dataclass
class TrainBatch:
    """Everything one update needs, row-aligned with the rollout (B samples, C completion columns)."""

    rollout: RolloutBatch
    advantages_BC: torch.Tensor  # (B, C)
    returns_BC: torch.Tensor  # (B, C)
    old_logprobs_BC: torch.Tensor  # (B, C) log-probs of the policy that sampled (behaviour policy)
    ref_logprobs_BC: torch.Tensor | None = None  # (B, C) reference-policy log-probs (KL as a loss term)
    old_values_BC: torch.Tensor | None = None  # (B, C) critic values at sampling time
    in_loss_B: torch.Tensor | None = None  # (B,) bool, False: the row is masked out of the loss (overlong filtering)
    sampler_weights_BC: torch.Tensor | None = None  # (B, C) importance weights for the sampler (core.mismatch)

    @property
    def mask_BC(self) -> torch.Tensor:
        """(B, C) the tokens the loss sees: the completions' real tokens, of the rows ``in_loss_B`` keeps."""
        mask_BC = self.rollout.completion_mask_BC
        return mask_BC if self.in_loss_B is None else mask_BC & self.in_loss_B.to(mask_BC.device)[:, None]

    def select(self, rows: torch.Tensor) -> "TrainBatch":
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TrainBatch(self.rollout.select(rows), self.advantages_BC[rows], self.returns_BC[rows],
                          self.old_logprobs_BC[rows], pick(self.ref_logprobs_BC), pick(self.old_values_BC),
                          pick(self.in_loss_B), pick(self.sampler_weights_BC))

    def to(self, device: torch.device) -> "TrainBatch":
        """The batch with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TrainBatch(self.rollout.to(device), self.advantages_BC.to(device), self.returns_BC.to(device),
                          self.old_logprobs_BC.to(device), move(self.ref_logprobs_BC), move(self.old_values_BC),
                          move(self.in_loss_B), move(self.sampler_weights_BC))


class NonFiniteError(RuntimeError):
    """A mini-batch's loss or gradient norm was NaN or infinite and the run was set to stop on it."""


@dataclass(frozen=True)
class UpdateSettings:
    """Plain arguments of an update, resolved once from the config (``seqpg.training.step.StepSettings``) and
    never changed during a run; what does change from step to step (the KL coefficient of an adaptive
    controller) is an argument of :func:`update`."""

    loss: str
    agg: str
    kl_estimator: str
    """The KL estimator of the KL loss term (the config's ``algo.kl_estimator``, as resolved for its ``kl_mode``)."""
    grad_noise: bool
    """Split a mini-batch that would be one micro-batch in two, so that the gradient noise scale is measured."""
    kl_noise_floor: float
    """|log pi - log pi_ref| at or below which the KL loss term of a token is 0 (:func:`seqpg.core.kl_estimate`;
    the config's ``algo.kl_noise_floor``, resolved for the run's precision)."""
    loss_params: dict = field(default_factory=dict)
    epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    entropy_coef: float = 0.0
    vf_coef: float = 0.5
    vf_clip: float | None = 0.2
    bf16: bool = False
    on_nonfinite: str = "skip"


class GradSync(Protocol):
    """How gradients cross processes (``seqpg.training.distributed.Parallel``)."""

    def no_sync(self) -> ContextManager:
        """Around the forward and backward of each micro-batch but the last: no reduction yet."""

    def sync_loose_grads(self) -> None:
        """After the last backward: sum the gradients that no wrapper reduced."""


def _sum_counts(mask_BC: torch.Tensor, all_reduce: Callable | None) -> tuple[float, float]:
    """(tokens, rows) the loss sees, over all processes; each at least 1 (a mini-batch that overlong
    filtering emptied has a loss of 0, not 0 / 0)."""
    counts = torch.stack([mask_BC.sum().float(), mask_BC.any(dim=1).sum().float()])
    if all_reduce is not None:
        counts = all_reduce(counts)
    return max(float(counts[0]), 1.0), max(float(counts[1]), 1.0)


def update(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch, s: UpdateSettings, *,
           kl_loss_coef: float = 0.0, critic=None, generator: torch.Generator | None = None,
           all_reduce: Callable | None = None, max_len: int | None = None,
           grad_sync: GradSync | None = None) -> dict[str, float]:
    """Run ``s.epochs`` passes of ``s.minibatches`` optimizer steps over ``batch``; return mean stats.

    ``kl_loss_coef`` weighs the KL-to-reference loss term (the batch's ``ref_logprobs_BC``; 0: none).
    ``critic`` (optional) has ``values(policy_out, rollout) -> (B, C)`` and parameters in the
    same optimizer.  ``all_reduce`` sums tensors across data-parallel processes (the counts that
    normalise the loss, and the statistics returned); ``grad_sync`` sums the gradients (once per
    mini-batch, in its last micro-batch).  Both default to one process.  ``batch`` may be on any
    device: ``completion_logprobs`` builds each micro-batch's layout on the CPU and runs the
    policy on its device, and the loss terms are moved there.
    """
    B, C = batch.mask_BC.shape
    max_len = max_len or C
    params = [p for g in optimizer.param_groups for p in g["params"]]
    totals: dict[str, float] = {}
    n_steps = 0
    device = model_device(policy)
    sharded = any(hasattr(p, "full_tensor") for p in params)  # FSDP2: no partial gradients to read, no split
    noise = GradientNoiseProbe(sharded)
    for _epoch in range(s.epochs):
        order = torch.randperm(B, generator=generator) if s.minibatches > 1 else torch.arange(B)
        for rows in order.chunk(s.minibatches):
            mb = batch.select(rows)
            num_tokens, num_seqs = _sum_counts(mb.mask_BC, all_reduce)
            optimizer.zero_grad(set_to_none=True)
            bounds = _micro_bounds(mb, s, sharded=sharded)
            mb_stats: dict[str, float] = {}
            for lo, hi in bounds:
                micro = mb.select(torch.arange(lo, hi))
                last = hi == len(rows)
                with nullcontext() if last or grad_sync is None else grad_sync.no_sync():
                    with autocast(device.type, s.bf16):
                        loss, st = _micro_loss(policy, critic, micro, s, kl_loss_coef, num_tokens, num_seqs,
                                               max_len)
                    loss.backward()
                if not last:
                    noise.after_partial_backward(params, rows_done=hi)
                share = float(micro.mask_BC.sum()) / max(num_tokens, 1.0)  # of the global mini-batch
                for k, v in st.items():
                    mb_stats[k] = mb_stats.get(k, 0.0) + (v if k.endswith("loss") else v * share)
            if grad_sync is not None:
                grad_sync.sync_loose_grads()
            grad_norm = _clip_grad_norm(params, s.max_grad_norm if s.max_grad_norm > 0 else float("inf"))
            loss_finite = _all_finite([mb_stats.get("loss", 0.0)], all_reduce)
            finite = math.isfinite(grad_norm) and loss_finite
            noise.end_minibatch(grad_norm, len(rows), keep=finite)
            if finite:  # an inf/nan gradient would corrupt every weight and the optimizer's moments
                optimizer.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                if s.on_nonfinite == "stop":
                    raise NonFiniteError(
                        f"the loss ({mb_stats.get('loss', float('nan')):.4g} here) or gradient norm ({grad_norm:.4g}) "
                        "is not finite; the run stopped before any step or checkpoint took it in. Lower optim.lr, "
                        "check the rewards, or set optim.on_nonfinite=skip to skip such mini-batches")
            for k, v in mb_stats.items():
                totals[k] = totals.get(k, 0.0) + v
            totals["grad_norm"] = totals.get("grad_norm", 0.0) + grad_norm
            totals["skipped_steps"] = totals.get("skipped_steps", 0.0) + (0.0 if finite else 1.0)
            totals["nonfinite_steps"] = totals.get("nonfinite_steps", 0.0) + (0.0 if finite else 1.0)
            n_steps += 1
    return {**_global_means(totals, n_steps, all_reduce), **noise.metrics(all_reduce)}


def _micro_bounds(mb: TrainBatch, s: UpdateSettings, *, sharded: bool) -> list[tuple[int, int]]:
    """[lo, hi) rows of each micro-batch of the mini-batch ``mb``: chunks of ``s.micro_batch_size`` rows,
    or, when that is one chunk and ``s.grad_noise`` is set, the two halves of :func:`noise_split`."""
    R = mb.mask_BC.shape[0]
    step = max(1, s.micro_batch_size or R)
    if step >= R and s.grad_noise and R >= 2 and not sharded:
        cut = noise_split(mb.rollout.group_ids_B)
        return [(0, cut), (cut, R)]
    return [(lo, min(lo + step, R)) for lo in range(0, R, step)]


def noise_split(group_ids_B: torch.Tensor) -> int:
    """Where to cut B rows in two for the gradient noise scale: the boundary between two groups (rows
    with different ``group_ids_B``) nearest B / 2, so each half holds whole groups (a group's rows are
    correlated: under a group baseline their advantages sum to 0); B // 2 when all rows are one group.

    group_ids_B: (B,) with B >= 2.  Returns 0 < cut < B.
    """
    if group_ids_B.ndim != 1 or group_ids_B.shape[0] < 2:
        raise ValueError(f"noise_split needs (B,) group ids with B >= 2, got shape {tuple(group_ids_B.shape)}")
    B = group_ids_B.shape[0]
    changes = (group_ids_B[1:] != group_ids_B[:-1]).nonzero().flatten() + 1  # cuts between groups
    if changes.numel() == 0:
        return B // 2
    return int(changes[(2 * changes - B).abs().argmin()])


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``clip_grad_norm_``, also for FSDP2's sharded (DTensor) gradients; returns the global norm.

    Gradients are scaled only when the norm exceeds ``max_norm`` (torch scales by exactly 1.0
    otherwise, a pass over every gradient for nothing)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if any(hasattr(g, "full_tensor") for g in grads):
        total = total.full_tensor()  # the norm over all shards
    norm = float(total)  # one read of the (possibly device) scalar
    if norm > max_norm:  # below it the scale is exactly 1: skip a pass over every gradient
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return norm


def refuse_nonfinite_parameters(modules: dict[str, torch.nn.Module], step: int) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter holding NaN or inf (this process's
    shard under FSDP2); called before a checkpoint is written, so none ever holds such weights."""
    for module_name, module in modules.items():
        for name, p in module.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if not bool(torch.isfinite(local.detach()).all()):
                raise NonFiniteError(f"{module_name} parameter {name} holds NaN or inf at step {step}; no checkpoint "
                                     "was written (the last one is intact). Lower optim.lr or optim.max_grad_norm "
                                     "and continue with --resume")


def _all_finite(values: list[float], all_reduce: Callable | None) -> bool:
    """Whether every process's ``values`` are finite (one reduction, so all processes agree)."""
    bad = torch.tensor(float(not all(math.isfinite(v) for v in values)))
    if all_reduce is not None:
        bad = all_reduce(bad)
    return float(bad) == 0.0


GLOBAL_STATS = ("grad_norm", "skipped_steps", "nonfinite_steps")
"""Statistics every process computes from global quantities already (not summed over processes)."""


def _global_means(totals: dict[str, float], n_steps: int, all_reduce: Callable | None) -> dict[str, float]:
    """Per-step means of the statistics, summed over processes (``GLOBAL_STATS`` are global already).

    ``skipped_steps`` becomes the fraction of optimizer steps skipped for a non-finite loss or gradient
    norm; ``nonfinite_steps`` stays their number."""
    keys = sorted(k for k in totals if k not in GLOBAL_STATS)
    if all_reduce is not None and keys:
        summed = all_reduce(torch.tensor([totals[k] for k in keys], dtype=torch.float64))
        totals = dict(totals, **dict(zip(keys, summed.tolist())))
    return {k: v if k == "nonfinite_steps" else v / n_steps for k, v in totals.items()}


def _micro_loss(policy, critic, micro: TrainBatch, s: UpdateSettings, kl_loss_coef: float, num_tokens: float,
                num_seqs: float, max_len: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch, normalised by its mini-batch's counts; and its statistics."""
    counts = dict(num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    out = completion_logprobs(policy, micro.rollout, temperature=s.temperature,
                              with_entropy=True, with_hidden=critic is not None and critic.shared)
    micro = micro.to(out.logprobs_BC.device)  # the loss terms where the log-probs are (the layout stayed on the host)
    mask = micro.mask_BC
    pg_loss, pst = core.policy_loss(s.loss, out.logprobs_BC, micro.advantages_BC, mask,
                                    old_logprobs=micro.old_logprobs_BC, agg=s.agg,
                                    sampler_weights=micro.sampler_weights_BC, **counts, **s.loss_params)
    loss = pg_loss
    stats = {"pg_loss": float(pg_loss.detach()), "clip_frac": float(pst.clip_frac), "approx_kl_old": float(pst.approx_kl)}
    stats["entropy"] = float(core.masked_mean(out.entropy_BC.detach(), mask)) if bool(mask.any()) else 0.0
    if s.entropy_coef:
        loss = loss - s.entropy_coef * core.aggregate_loss(out.entropy_BC, mask, s.agg, **counts)
    if kl_loss_coef and micro.ref_logprobs_BC is not None:
        kl = core.kl_loss(out.logprobs_BC, micro.ref_logprobs_BC, mask, estimator=s.kl_estimator, agg=s.agg,
                          tol=s.kl_noise_floor, **counts)
        loss = loss + kl_loss_coef * kl
        stats["kl_loss"] = float(kl.detach())
    if critic is not None:
        values = critic.values(out, micro.rollout)
        vloss, vst = core.value_loss(values, micro.returns_BC, mask, old_values=micro.old_values_BC,
                                     clip_range=s.vf_clip, agg=s.agg, **counts)
        loss = loss + s.vf_coef * vloss
        stats["value_loss"] = float(vloss.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats
