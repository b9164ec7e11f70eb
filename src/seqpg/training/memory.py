"""Freed memory kept for reuse: glibc ``malloc`` settings for a training process.

A training step allocates and frees the same large buffers every time: gradients (set to None
after each optimizer step), bf16 copies of the weights under autocast, activations, logits.  By
default glibc serves blocks above 32 MiB with ``mmap`` and returns them with ``munmap`` when freed,
so every step faults in fresh zeroed pages from the kernel for hundreds of MiB.  Measured on the
project's 2-core VM (SmolLM2-135M, the benchmark's GRPO step, A/B over separate processes,
medians of 5 updates): the update took 3.16 -> 2.92 s in fp32 and 2.00 -> 1.72 s in
bf16 with :func:`keep_freed_memory`, peak resident memory unchanged (3.35-3.41 GiB either way),
because the step's peak is the same set of buffers each time.

``keep_freed_memory`` serves every allocation from the heap (``M_MMAP_MAX = 0``) and keeps freed
memory for the next allocation (``M_TRIM_THRESHOLD`` at its maximum), so after the first step
the same pages are reused.  The process never gives memory back to the system before it exits,
which is what a training process does anyway; ``keep_freed_memory: false`` in the configuration
turns it off.  It does nothing on a C library other than glibc.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """Apply the malloc settings above to this process (once); True when they took effect."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _done = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
