"""Device handling that can be checked without a GPU (the GPU itself: tests/train/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from seqpg.devices import resolve_device


def test_resolve_device_names_and_refusals(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", 0) == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=1 needs GPU 1, but 1 CUDA device"):
        resolve_device("auto", 1)  # two processes per machine on a one-GPU machine


def test_batches_move_whole_and_stay_put_when_already_there(make_rollout):
    batch = make_rollout([[5, 6], [7]], [[8, 9, 10], [11]], group_ids=[0, 1])
    assert batch.to("cpu") is batch
    moved = batch.to(torch.device("meta"))  # any other device: every tensor goes, the texts stay
    assert all(getattr(moved, n).device.type == "meta" for n in (
        "prompt_ids_BP", "prompt_mask_BP", "completion_ids_BC", "completion_mask_BC", "sample_logprobs_BC",
        "group_ids_B", "finished_B"))
    assert moved.prompts is batch.prompts and moved.completions is batch.completions

