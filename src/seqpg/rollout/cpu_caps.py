"""What this CPU and this torch build can do, for the CPU paths whose speed or validity depend on it.

Each check answers from torch's own tests, once per process (cached), so no code path assumes an
x86 CPU with AVX-512:

- ``onednn_linear``: torch has oneDNN's prepacked linear (``torch.ops.mkldnn._reorder_linear_weight``
  and ``_linear_pointwise``, what inductor uses for frozen CPU linears).  ARM and other builds
  without oneDNN lack it.
- ``onednn_bf16``: oneDNN may run bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``): x86 with
  AVX-512 BW/VL/DQ or AVX-NE-CONVERT, ARM with its BF16 extension.  Without it torch refuses to
  repack a bf16 weight ("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and
  avx512dq") and runs bf16 matrix products on its own slower kernels.
- ``native_bf16``: the CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX-BF16, ARM BF16).
  Elsewhere bf16 autocast still works but converts to float32 around every product: slower than
  float32, not faster.

``SEQPG_CPU_CAPS`` turns checks off (never on), read here only: ``none`` turns all off, a
comma-separated list of names keeps those (when the machine has them) and turns the rest off.  It
lets one machine run the paths every other CPU takes; tests monkeypatch the functions instead.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings

import torch

CAPS = ("onednn_linear", "onednn_bf16", "native_bf16")
ENV = "SEQPG_CPU_CAPS"


def _allowed(name: str) -> bool:
    """False where ``SEQPG_CPU_CAPS`` turns the check ``name`` off."""
    value = os.environ.get(ENV)
    if value is None:
        return True
    names = {n.strip() for n in value.split(",") if n.strip()} - {"none"}
    unknown = names - set(CAPS)
    if unknown:
        raise ValueError(f"{ENV}={value!r}: unknown {sorted(unknown)}; use 'none' or names from {list(CAPS)}")
    return name in names


def onednn_linear() -> bool:
    """True where torch has oneDNN's prepacked linear ops (CPU builds with mkldnn)."""
    return _allowed("onednn_linear") and _detect_onednn_linear()


def onednn_bf16() -> bool:
    """True where oneDNN may run bf16 (repack and multiply bf16 weights) on this CPU."""
    return _allowed("onednn_bf16") and _detect_onednn_bf16()


def native_bf16() -> bool:
    """True where the CPU has bf16 arithmetic units (AVX512-BF16, AMX-BF16, ARM BF16)."""
    return _allowed("native_bf16") and _detect_native_bf16()


@functools.cache
def _detect_onednn_linear() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


@functools.cache
def _detect_onednn_bf16() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


@functools.cache
def _detect_native_bf16() -> bool:
    if platform.machine().lower() in ("aarch64", "arm64"):
        return _detect_onednn_bf16()  # on ARM torch's oneDNN bf16 check is the CPU's BF16 extension
    get = getattr(torch.cpu, "get_capabilities", None)
    caps = get() if get is not None else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


_warned: set[str] = set()


def warn_if_bf16_is_slow(device: torch.device | str, key: str = "bf16=true") -> None:
    """Warn once per process and ``key`` (the setting that asked: ``bf16=true``, ``sampling.dtype=bfloat16``)
    when bf16 autocast is asked for on a CPU without bf16 units."""
    if torch.device(device).type != "cpu" or native_bf16() or key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"{key} on a CPU without bf16 arithmetic units (AVX512-BF16, AMX or ARM BF16): it runs, but every "
                  "product converts to float32 and back, so it is slower than float32", stacklevel=2)
