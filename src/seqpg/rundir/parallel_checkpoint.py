"""A run's checkpoints under any process layout (:class:`seqpg.training.distributed.Parallel`): what the
trainer saves after a step and loads on ``--resume``.

    save   sharded layout (``parallel=fsdp2``): every process writes its own shards
           (:func:`seqpg.rundir.checkpoint_dcp.save_sharded_checkpoint`); otherwise rank 0 writes the
           whole model and optimizer state (``Parallel.checkpoint_view``, then
           :func:`seqpg.rundir.checkpoint.save_checkpoint`)
    load   a sharded checkpoint is read straight into this process's shards (DCP reshards); a whole one
           into the plain modules, or under FSDP2 into plain copies cut into shards
           (``Parallel.read_into_shards``).  No collectives; the global RNG streams are restored.

The process layout (who gathers, who shards) is the ``Parallel``'s; the files are this package's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import checkpoint as whole  # through the module: whole.save_checkpoint is what every whole save runs
from .checkpoint_dcp import is_sharded_checkpoint, save_sharded_checkpoint

if TYPE_CHECKING:
    from ..training.distributed import Parallel


def save_parallel_checkpoint(parallel: "Parallel", run_dir, step: int, optimizer: torch.optim.Optimizer, *,
                             trainer_state: dict, scheduler, keep_last: int | None, tokenizer) -> None:
    """Write the checkpoint of ``step``; every process calls this (module docstring)."""
    if parallel.sharded_checkpoints:
        save_sharded_checkpoint(run_dir, step, modules={"policy": parallel.raw_policy, **parallel.extra_modules},
                                optimizer=optimizer, dist=parallel.dist, trainer_state=trainer_state,
                                scheduler=scheduler, keep_last=keep_last, tokenizer=tokenizer)
        return
    view = parallel.checkpoint_view(optimizer)
    with parallel.dist.fail_together("checkpoint"):
        if view is not None:
            whole.save_checkpoint(run_dir, step, model=view.model, optimizer=view.optimizer,
                            extra_modules=view.extra_modules, trainer_state=trainer_state, scheduler=scheduler,
                            keep_last=keep_last, tokenizer=tokenizer)


def load_parallel_checkpoint(parallel: "Parallel", ckpt, optimizer: torch.optim.Optimizer, scheduler, *,
                             verify: bool = True) -> dict:
    """Load a checkpoint (written with any number of processes) on this process; its trainer state.
    ``verify``: as in :func:`seqpg.rundir.checkpoint.load_checkpoint` (False where the caller has)."""
    if parallel.mode != "fsdp2" or is_sharded_checkpoint(whole.resolve_checkpoint(ckpt)):
        return whole.load_checkpoint(ckpt, model=parallel.raw_policy, optimizer=optimizer,
                               extra_modules=parallel.extra_modules, scheduler=scheduler, verify=verify)
    return parallel.read_into_shards(
        lambda view: whole.load_checkpoint(ckpt, model=view.model, optimizer=view.optimizer,
                                     extra_modules=view.extra_modules, scheduler=scheduler, verify=verify),
        optimizer)
