"""The CPU capability checks (seqpg.rollout.cpu_caps): torch's own answers, turned off by SEQPG_CPU_CAPS, and the
one warning for bf16 on a CPU without bf16 units."""

from __future__ import annotations

import warnings

import pytest
import torch

from seqpg.rollout import cpu_caps


def test_the_checks_are_torchs_own():
    assert cpu_caps.onednn_bf16() == (torch.backends.mkldnn.is_available()
                                      and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    assert cpu_caps.onednn_linear() == (torch.backends.mkldnn.is_available()
                                        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    if cpu_caps.native_bf16() and torch.cpu.get_capabilities().get("architecture") == "x86_64":
        assert torch.cpu._is_avx512_bf16_supported() or torch.cpu.get_capabilities()["amx_bf16"]


def test_the_environment_turns_checks_off_and_never_on(monkeypatch):
    detected = {name: getattr(cpu_caps, name)() for name in cpu_caps.CAPS}
    monkeypatch.setenv(cpu_caps.ENV, "none")
    assert not any(getattr(cpu_caps, name)() for name in cpu_caps.CAPS)
    monkeypatch.setenv(cpu_caps.ENV, "onednn_linear, native_bf16")
    assert cpu_caps.onednn_linear() == detected["onednn_linear"]
    assert cpu_caps.native_bf16() == detected["native_bf16"]
    assert not cpu_caps.onednn_bf16()
    monkeypatch.setattr(cpu_caps, "_detect_onednn_linear", lambda: False)
    assert not cpu_caps.onednn_linear()  # listed, but the machine lacks it
    monkeypatch.setenv(cpu_caps.ENV, "avx512")
    with pytest.raises(ValueError, match="unknown.*avx512.*onednn_linear"):
        cpu_caps.onednn_linear()


def test_bf16_on_a_cpu_without_bf16_units_warns_once(monkeypatch):
    monkeypatch.setattr(cpu_caps, "_warned", set())
    monkeypatch.setattr(cpu_caps, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16=true on a CPU without bf16") as caught:
        for _ in range(3):
            cpu_caps.warn_if_bf16_is_slow("cpu")
    assert len(caught) == 1
    monkeypatch.setattr(cpu_caps, "_warned", set())
    monkeypatch.setattr(cpu_caps, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu_caps.warn_if_bf16_is_slow("cpu")  # bf16 units: nothing to say
        monkeypatch.setattr(cpu_caps, "native_bf16", lambda: False)
        cpu_caps.warn_if_bf16_is_slow("cuda")  # not about GPUs
    with pytest.warns(UserWarning, match="sampling.dtype=bfloat16 on a CPU without bf16"):
        cpu_caps.warn_if_bf16_is_slow("cpu", "sampling.dtype=bfloat16")  # a warning of its own
