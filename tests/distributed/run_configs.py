"""Run several training configurations in one multi-process launch (one start-up for many checks).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/run_configs.py JOBS.json

JOBS.json holds a list of {"overrides": [key=value, ...], "resume": bool}.  The process group is
created here, once, so every ``train()`` call runs inside it (and leaves it open for the next).
A job that raises is recorded (rank, exception type, message, seconds) in RUN_DIR/error-rank<R>.json
and the next job still runs: a failure that ``fail_together`` reports leaves the group usable.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch.distributed as tdist

from seqpg.config import load_config
from seqpg.training.trainer import train


def main(jobs_path: str) -> None:
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    for job in json.loads(Path(jobs_path).read_text()):
        cfg = load_config(None, job["overrides"])
        t0 = time.monotonic()
        try:
            train(cfg, resume=job.get("resume", False), progress=False)
        except Exception as e:  # noqa: BLE001 -- recorded for the test to inspect
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            record = {"rank": rank, "type": type(e).__name__, "message": str(e), "notes": getattr(e, "__notes__", []),
                      "seconds": time.monotonic() - t0}
            (Path(cfg.run_dir) / f"error-rank{rank}.json").write_text(json.dumps(record))
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
