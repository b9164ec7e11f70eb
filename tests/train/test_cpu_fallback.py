"""bf16 training on an x86 CPU with AVX2 but no AVX-512, simulated on any machine: oneDNN's prepacked
linear is there but neither oneDNN bf16 nor bf16 units are, oneDNN's repacking refuses bf16 as torch
does on such a CPU, and torch's own matrix products avoid oneDNN."""

from __future__ import annotations

import statistics

import pytest
import torch

from seqpg.rollout import cpu_caps
from seqpg.config import load_config
from seqpg.rundir.runfiles import read_jsonl
from seqpg.training.trainer import train


def test_bf16_trains_and_warns_once_on_a_cpu_without_bf16(tiny_overrides, monkeypatch):
    monkeypatch.setenv(cpu_caps.ENV, "onednn_linear")
    monkeypatch.setattr(cpu_caps, "_warned", set())
    if cpu_caps._detect_onednn_linear():
        real = torch.ops.mkldnn._reorder_linear_weight

        def reorder(w, *args):
            if w.dtype == torch.bfloat16:
                raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert "
                                   "or avx512bw, avx512vl and avx512dq")
            return real(w, *args)

        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    cfg = load_config(None, tiny_overrides("algo.name=grpo", "steps=30", "bf16=true"))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with pytest.warns(UserWarning, match="bf16=true on a CPU without bf16") as caught:
        rewards = [m["reward_mean"] for m in read_jsonl(train(cfg, progress=False).run_dir / "metrics.jsonl")]
    assert len([w for w in caught if "bf16=true" in str(w.message)]) == 1
    first, last = rewards[:5], rewards[-5:]  # it learns (see test_learning), not merely runs
    se = (statistics.pvariance(first) / 5 + statistics.pvariance(last) / 5) ** 0.5
    assert statistics.mean(last) - statistics.mean(first) > max(0.3, 6 * se), rewards
