"""seqpg.training.memory: freed memory stays in the process for reuse (checked in a fresh process)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, sys
import torch
from seqpg.training.memory import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
x = torch.ones(64 * 2**20 // 4)  # 64 MiB
mmapped = libc.mallinfo2().hblkhd  # bytes in mmap-ed blocks
del x
free_in_heap = libc.mallinfo2().fordblks  # bytes freed but kept by malloc
print(mmapped >= 64 * 2**20, free_in_heap >= 64 * 2**20)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("mode,expected", [("keep", "False True"), ("default", "True False")])
def test_freed_memory_is_kept_in_the_heap(mode, expected):
    """By default a 64 MiB tensor is mmap-ed and handed back when freed; after keep_freed_memory it
    comes from the heap and stays there for the next allocation."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == expected, out.stdout + out.stderr


def test_the_config_switch_defaults_on():
    from seqpg.config import load_config

    assert load_config(None, []).keep_freed_memory is True
    assert load_config(None, ["keep_freed_memory=false"]).keep_freed_memory is False
