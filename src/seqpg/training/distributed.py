"""Data parallelism on PyTorch's own engine (torch.distributed), and the one-process case.

``DistContext.from_env()`` reads the variables ``torchrun`` sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ...).  Without them it is a one-process context whose reductions
are the identity, so the trainer has a single code path.

Gradients are SUMMED across processes, never averaged.  Every process's loss is its share of
the global loss (its own sums divided by the global token and sequence counts), so the
gradient of the global loss is the sum of the processes' gradients, whatever their number:

    L = sum_r L_r,   L_r = (sum over the tokens of process r) / (global count)
    dL/dθ = sum_r dL_r/dθ

DDP averages by default; it gets a summing communication hook instead (``_sum_hook``).  FSDP2
gets a gradient divide factor of 1 with sum-only reductions.  Parameters outside the wrapped
policy (the critic under DDP) are summed by hand after the last micro-batch.

What crosses processes: the loss normalisers (token and sequence counts), batch statistics of
advantage estimators that need them (whitening, REINFORCE++, batch-mean baselines), the
gradients (DDP's all-reduce, or FSDP2's reduce-scatter), logged metrics and samples, and a
"did anyone fail?" flag after every phase that runs without collectives
(:meth:`DistContext.fail_together`), so that one process's error stops all of them at once.

Layouts of the trained modules (:class:`Parallel`): one process (nothing to do); ``ddp`` (a
full replica per process, PyTorch's DistributedDataParallel); ``fsdp2`` (``fully_shard`` on
each decoder layer, then on the whole module: parameters, gradients and optimizer state are
sharded, and gathered layer by layer for each forward and backward).  Sampling runs on the
plain module: under FSDP2 the parameters are gathered for the whole of generation, because
processes decode different numbers of tokens and per-layer gathers are collectives.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist
from torch import nn

from ..devices import resolve_device

PARALLEL_MODES = ("ddp", "fsdp2")


class ProcessFailed(RuntimeError):
    """Another process of a multi-process run failed; raised on each process that did not."""


def failed_together(error: BaseException, dist: "DistContext") -> bool:
    """True when every process raised at the same point (always in one process): they may still act together."""
    return not dist.enabled or getattr(error, "seqpg_failed_together", False)


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False
    """True when ``from_env`` created the process group (and ``close`` destroys it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def from_env(device: str = "auto", backend: str = "auto", timeout_s: float = 1800.0) -> "DistContext":
        """Join the process group that torchrun describes, or return a one-process context.

        ``backend`` ``auto`` is NCCL on GPUs and gloo on CPU.  ``timeout_s`` bounds how long a
        collective waits for the other processes before it fails (instead of hanging).
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local)
        want_cuda = dev.type == "cuda"
        if want_cuda:
            torch.cuda.set_device(dev)
        if world <= 1:
            return DistContext(device=dev)
        backend = ("nccl" if want_cuda else "gloo") if backend == "auto" else backend
        owns = not tdist.is_initialized()
        if owns:
            tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                     device_id=dev if want_cuda else None)
        return DistContext(tdist.get_rank(), tdist.get_world_size(), local, dev, tdist.get_backend(), owns)

    # -- reductions: identities in one process ------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, tdist.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, tdist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (so all take the same branch)."""
        return bool(self.all_reduce_max(torch.tensor(int(flag))))

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every process along dim 0, in rank order."""
        if not self.enabled:
            return t
        src = t.detach().contiguous().to(self._comm_device())
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        tdist.all_gather(parts, src)
        return torch.cat(parts).to(t.device)

    def gather_objects(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects) on every process."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def _all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if not self.enabled:
            return t
        out = t.detach().clone().to(self._comm_device())
        tdist.all_reduce(out, op=op)
        return out.to(t.device)

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # -- failures --------------------------------------------------------------------------------
    @contextmanager
    def fail_together(self, phase: str) -> Iterator[None]:
        """Run a phase that makes no collective calls; if it raises on any process, raise on all.

        After the phase every process all-reduces a failure flag (one small collective).  The
        process that failed re-raises its own exception, with a note naming its rank; every
        other process raises :class:`ProcessFailed` with the failing rank's error message.  In
        one process this is a no-op.  Either error is marked (:func:`failed_together`): every
        process knows of it, so all may still act together (save a checkpoint, say).
        """
        if not self.enabled:
            yield
            return
        error: BaseException | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- reported to every process, then re-raised
            error = e
        if not self.any(error is not None):
            return
        messages = self.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        ranks = ", ".join(str(r) for r, _ in failed)
        summary = (f"rank {failed[0][0]} of {self.world_size} failed during {phase}: {failed[0][1]}"
                   + (f" (failed ranks: {ranks})" if len(failed) > 1 else ""))
        # torchrun stops the other processes as soon as one exits: say why on every one of them first
        print(f"seqpg [rank {self.rank}]: stopping: {summary}", file=sys.stderr, flush=True)
        self.barrier()
        if error is not None:
            error.seqpg_failed_together = True
            error.add_note(f"seqpg: rank {self.rank} of {self.world_size} failed during {phase}; "
                           f"all processes stop (failed ranks: {ranks})")
            raise error
        others = ProcessFailed(summary)
        others.seqpg_failed_together = True
        raise others

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Layout of the trained modules: one process, DDP replicas, or FSDP2 shards
# ---------------------------------------------------------------------------------------------

@dataclass
class CheckpointView:
    """What ``save_checkpoint`` / ``load_checkpoint`` take: plain modules and an optimizer state."""

    model: nn.Module
    optimizer: Any
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)


class _StateHolder:
    """Stands in for an optimizer in checkpoint I/O: holds a plain (full, unsharded) state dict."""

    def __init__(self, state: dict | None = None) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _sum_hook(process_group, bucket):
    """DDP communication hook: SUM the gradients across processes (DDP's default averages)."""
    work = tdist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class Parallel:
    """The trained modules laid out over processes, and what the update and checkpoints need of them.

    ``policy`` is the module the update calls (the DDP wrapper, the FSDP2-sharded module, or
    the plain module); ``extra_modules`` (the critic) are sharded under FSDP2 and summed by hand
    under DDP.  Build with :meth:`wrap`, before the optimizer (FSDP2 replaces the parameters).
    ``sharded_checkpoints``: checkpoints are written by every process, each its own shards
    (:mod:`seqpg.rundir.checkpoint_dcp`), rather than whole by rank 0; so under ``parallel=fsdp2``,
    with any number of processes.
    """

    def __init__(self, dist: DistContext, mode: str, policy: nn.Module, raw_policy: nn.Module,
                 extra_modules: dict[str, nn.Module], skeletons: dict[str, nn.Module] | None = None,
                 sharded_checkpoints: bool = False) -> None:
        self.dist, self.mode, self.policy, self.raw_policy = dist, mode, policy, raw_policy
        self.extra_modules = extra_modules
        self.sharded_checkpoints = sharded_checkpoints
        self._skeletons = skeletons or {}
        self._loose = [p for m in extra_modules.values() for p in m.parameters() if p.requires_grad] \
            if mode == "ddp" else []

    @staticmethod
    def wrap(policy: nn.Module, extra_modules: dict[str, nn.Module], dist: DistContext, mode: str) -> "Parallel":
        """Replicate (``ddp``) or shard (``fsdp2``) across processes; in one process, leave as is.

        Every process must call this (it broadcasts rank 0's weights, so replicas start equal).
        """
        if mode not in PARALLEL_MODES:
            raise ValueError(f"parallel={mode!r}; choose one of: {', '.join(PARALLEL_MODES)}")
        if not dist.enabled:
            return Parallel(dist, "none", policy, policy, extra_modules, sharded_checkpoints=mode == "fsdp2")
        if mode == "ddp":
            for m in extra_modules.values():
                _broadcast_from_rank0(m)
            device_ids = [dist.device] if dist.device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(policy, device_ids=device_ids)
            ddp.register_comm_hook(None, _sum_hook)
            return Parallel(dist, mode, ddp, policy, extra_modules)
        modules = {"policy": policy, **extra_modules}
        skeletons = {name: _meta_copy(m) for name, m in modules.items()}
        for m in modules.values():
            _broadcast_from_rank0(m)
            _fully_shard(m)
        return Parallel(dist, mode, policy, policy, extra_modules, skeletons, sharded_checkpoints=True)

    # -- the update ------------------------------------------------------------------------------
    def no_sync(self):
        """Context for the forward and backward of every micro-batch but a mini-batch's last:
        gradients accumulate locally and are reduced once, in the last backward."""
        if self.mode == "ddp":
            return self.policy.no_sync()
        if self.mode == "fsdp2":
            return self._fsdp_gradient_sync_off()
        return nullcontext()

    @contextmanager
    def _fsdp_gradient_sync_off(self) -> Iterator[None]:
        roots = [self.policy, *self.extra_modules.values()]
        for m in roots:
            m.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for m in roots:
                m.set_requires_gradient_sync(True)

    def sync_loose_grads(self) -> None:
        """Sum, across processes, the gradients that no wrapper reduces (the critic under DDP)."""
        if not self._loose:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._loose]
        flat = self.dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        for p, g in zip(self._loose, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).to(p.dtype)

    # -- sampling ----------------------------------------------------------------------------------
    @contextmanager
    def full_params(self) -> Iterator[nn.Module]:
        """The plain policy with all its parameters in place, for ``generate``.

        Under FSDP2 every process gathers the full parameters on entry (a collective) and keeps
        them for the whole block, so its forward passes make no collective calls; they are
        sharded again on exit.
        """
        if self.mode != "fsdp2":
            yield self.raw_policy
            return
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in self.policy.modules() if isinstance(m, FSDPModule)]
        for m in sharded:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield self.policy
        finally:
            for m in sharded:
                m.reshard()
                m.set_reshard_after_forward(m is not self.policy, recurse=False)  # FSDP2's defaults

    # -- checkpoints (the files are seqpg.rundir's: seqpg.rundir.parallel_checkpoint) ----------------
    def checkpoint_view(self, optimizer: torch.optim.Optimizer) -> CheckpointView | None:
        """Plain modules and optimizer state to save; None on processes other than rank 0.

        Under FSDP2 the full tensors are gathered from the shards (a collective: every process
        calls this) into CPU copies on rank 0, so the checkpoint is the same as a one-process
        run's and resumes with any number of processes.  (The trainer's checkpoints do not gather
        under FSDP2: every process writes its shards, :mod:`seqpg.rundir.parallel_checkpoint`.)
        """
        if self.mode != "fsdp2":
            return CheckpointView(self.raw_policy, optimizer, dict(self.extra_modules)) if self.dist.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = {name: get_model_state_dict(m, options=options)
                for name, m in {"policy": self.policy, **self.extra_modules}.items()}
        optim_state = _gather_optimizer_state(optimizer, keep=self.dist.is_main)
        if not self.dist.is_main:
            return None
        plain = {name: self._plain_copy(name, state) for name, state in full.items()}
        policy = plain.pop("policy")
        return CheckpointView(policy, _StateHolder(optim_state), plain)

    def read_into_shards(self, read: Callable[[CheckpointView], dict], optimizer: torch.optim.Optimizer) -> dict:
        """Under FSDP2, load a whole (unsharded) checkpoint: ``read(view)`` fills plain CPU copies of the
        modules and a holder of the optimizer state, which are then cut into this process's shards (no
        collectives).  Returns what ``read`` returned (the checkpoint's trainer state)."""
        from ..model.loading import is_lora_model

        plain = {name: self._plain_copy(name) for name in ("policy", *self.extra_modules)}
        holder = _StateHolder()
        state = read(CheckpointView(plain["policy"], holder, {k: v for k, v in plain.items() if k != "policy"}))
        for name, m in {"policy": self.policy, **self.extra_modules}.items():
            # a PEFT checkpoint holds the adapters only: the frozen base weights stay as they were built
            only = {n for n, p in m.named_parameters() if p.requires_grad} if is_lora_model(m) else None
            _copy_into_shards(m, plain[name].state_dict(), only)
        optimizer.load_state_dict(_shard_optimizer_state(holder.state, optimizer))
        return state

    def _plain_copy(self, name: str, state: dict | None = None) -> nn.Module:
        """A plain CPU module shaped like ``name`` (from its skeleton), holding ``state`` if given."""
        m = copy.deepcopy(self._skeletons[name]).to_empty(device="cpu")
        tie = getattr(m, "tie_weights", None)
        if callable(tie):
            tie()  # to_empty leaves tied weights (embeddings = LM head) as two tensors
        if state is not None:
            m.load_state_dict(state, strict=True)
        return m


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _broadcast_from_rank0(module: nn.Module) -> None:
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            tdist.broadcast(t.data, src=0)


def _fully_shard(module: nn.Module) -> None:
    """FSDP2: shard each decoder layer (the classes the model lists as ``_no_split_modules``),
    then the module itself; gradients are summed across processes, not averaged."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as e:
        raise RuntimeError(f"parallel=fsdp2 needs torch's fully_shard (torch >= 2.6; this is {torch.__version__}); "
                           "use parallel=ddp") from e

    layer_classes = set()
    for m in module.modules():
        layer_classes |= set(getattr(m, "_no_split_modules", None) or ())
    for m in list(module.modules()):
        if m is not module and type(m).__name__ in layer_classes:
            fully_shard(m)
    fully_shard(module)
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    # FSDP2 takes the first module to run forward as the root.  The sampler may enter at the decoder
    # (a trunk-only prefill), so settle now that the root is ``module`` (local, no collectives).
    module._get_fsdp_state()._lazy_init()


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every parameter and buffer on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _gather_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
    """The optimizer's state dict with every sharded tensor gathered whole onto the CPU.

    Collective: every process gathers in the same order (by parameter index); only ``keep``
    processes hold the result.
    """
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        entry = {}
        for k, v in sd["state"][idx].items():
            full = v.full_tensor() if isinstance(v, DTensor) else v
            entry[k] = full.cpu() if torch.is_tensor(full) else full
        state[idx] = entry
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


def _shard_optimizer_state(sd: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict cut into this process's shards (local slicing, no collectives)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, entry in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                      if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                      for k, v in entry.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _copy_into_shards(module: nn.Module, full: dict[str, torch.Tensor], only: set[str] | None = None) -> None:
    """Copy full tensors (those named in ``only``, or all) into an FSDP2 module's shards (local
    slicing, no collectives)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, t in module.state_dict().items():
            if only is not None and name not in only:
                continue
            src = full[name].to(device=t.device, dtype=t.dtype)
            if isinstance(t, DTensor):
                t.to_local().copy_(distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None).to_local())
            else:
                t.copy_(src)
