"""Data parallelism on PyTorch's own engine (torch.distributed), and the one-process case.

``DistContext.from_env()`` reads the variables ``torchrun`` sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ...).  Without them it is a one-process context whose reductions
are the identity, so the trainer has a single code path.

What crosses processes: the loss normalisers (token and sequence counts), batch statistics of
advantage estimators that need them (whitening, REINFORCE++, batch-mean baselines), the
gradients (DDP's all-reduce, or FSDP2's reduce-scatter), and logged metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def from_env(device: str = "auto", backend: str | None = None) -> "DistContext":
        """Join the process group that torchrun describes, or return a one-process context."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(dev)
        if world <= 1:
            return DistContext(device=dev)
        backend = backend or os.environ.get("SEQPG_DIST_BACKEND") or ("nccl" if want_cuda else "gloo")
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend, device_id=dev if want_cuda else None)
        return DistContext(tdist.get_rank(), tdist.get_world_size(), local, dev, backend)

    # -- reductions: identities in one process ------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        out = t.detach().clone().to(self._comm_device())
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out.to(t.device)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        out = t.detach().clone().to(self._comm_device())
        tdist.all_reduce(out, op=tdist.ReduceOp.MAX)
        return out.to(t.device)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(t) / self.world_size

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every process along dim 0."""
        if not self.enabled:
            return t
        src = t.detach().contiguous().to(self._comm_device())
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        tdist.all_gather(parts, src)
        return torch.cat(parts).to(t.device)

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @staticmethod
    def unwrap(model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.destroy_process_group()
