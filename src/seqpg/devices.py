"""Which device a process runs on: the one place ``device: auto | cpu | cuda`` is resolved (the training
processes, the scorers' models, ``seqpg eval`` / ``explain`` / ``lab``)."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """The configured device (``cpu``, ``cuda`` or ``auto``: CUDA when visible) as this process's
    ``torch.device``: GPU ``local_rank``, by default torchrun's ``LOCAL_RANK`` (0 without torchrun)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {device!r}")
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if want_cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"process LOCAL_RANK={local_rank} needs GPU {local_rank}, but {torch.cuda.device_count()} "
                           "CUDA device(s) are visible: launch at most one process per GPU (torchrun "
                           "--nproc_per_node), or set device=cpu")
    return torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
