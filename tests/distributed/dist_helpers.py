"""Helpers for the multi-process tests: the prompt words, a free port, a torchrun launcher.

Imported by name (``from dist_helpers import ...``; conftest.py puts this folder on sys.path), not
from ``conftest``, which names a different module in each test folder.
"""

from __future__ import annotations

import os
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
    output: str  # torchrun's console: its own lines and the processes' lines, interleaved
    log_dir: Path

    def rank_lines(self, rank: int) -> str:
        """What the process of ``rank`` printed to stdout and stderr, read from its own log files.

        Not parsed from ``output``: torchrun's --tee copies each process's files to the console by
        polling them, and a line read half-written can be finished on a line another process's
        copy began, so a line of one process may not start with its ``[default<rank>]:`` prefix.
        """
        files = sorted(self.log_dir.glob(f"*/attempt_*/{rank}/std*.log"))
        if not files:
            raise FileNotFoundError(f"no log files of rank {rank} under {self.log_dir}")
        return "\n".join(f.read_text(errors="replace") for f in files)


def torchrun(nproc: int, *target: str, log_dir: Path, timeout: float = 120) -> Launch:
    """Run ``python -m torch.distributed.run --nproc_per_node nproc TARGET...`` on this machine,
    each process's output also written under ``log_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--tee", "3",
           "--log-dir", str(log_dir), *target]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*REWARDS_DIRS, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return Launch(proc.returncode, time.monotonic() - t0, proc.stdout + proc.stderr, log_dir)
