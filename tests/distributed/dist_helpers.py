"""Helpers for the multi-process tests: the prompt words, a free port, a torchrun launcher.

Imported by name (``from dist_helpers import ...``; conftest.py puts this folder on sys.path), not
from ``conftest``, which names a different module in each test folder.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
REWARDS_DIRS = [str(HERE), str(HERE.parent / "train")]  # dist_test_rewards, seqpg_test_rewards

WORDS = ["cat", "dog", "sun", "sea", "sky", "red", "big", "tea", "cup", "map", "owl", "fox", "ink", "jam",
         "kit", "log", "mud", "net", "oak", "pen", "rug", "toy", "urn", "van", "web", "yak", "zip", "elm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    returncode: int
    seconds: float
    output: str

    def rank_lines(self, rank: int) -> str:
        """What the process of ``rank`` printed (torchrun --tee prefixes its lines with [default<rank>])."""
        return "\n".join(m.group(1) for m in re.finditer(rf"^\[default{rank}\]:(.*)$", self.output, re.M))


def torchrun(nproc: int, *target: str, timeout: float = 120) -> Launch:
    """Run ``python -m torch.distributed.run --nproc_per_node nproc TARGET...`` on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--tee", "3", *target]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*REWARDS_DIRS, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return Launch(proc.returncode, time.monotonic() - t0, proc.stdout + proc.stderr)
