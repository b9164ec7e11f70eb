"""The files of a run directory that more than one module reads: their names, and the JSON-lines reader.

:mod:`seqpg.rundir.runlog` writes them, :mod:`seqpg.rundir.plots` and the commands read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "config.yaml"


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({e}); fix or remove that line") from e
    return records
